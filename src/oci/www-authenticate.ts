/**
 * `WWW-Authenticate` parsing (RFC 9110 §11.6.1): one or more challenges, each a scheme followed by
 * either a token68 or comma-separated `name=value` parameters whose values may be quoted strings
 * containing commas and backslash escapes. Several header lines joined with ", " parse the same.
 */

export interface AuthChallenge {
  /** Lowercased scheme: `bearer`, `basic`, … */
  readonly scheme: string;
  /** Parameters with lowercased names (`realm`, `service`, `scope`, `error`, …). */
  readonly params: Readonly<Record<string, string>>;
  /** The token68 form (`Negotiate abc==`), if used instead of parameters. */
  readonly token68?: string | undefined;
}

const TCHAR = /[!#$%&'*+\-.^_`|~0-9A-Za-z]/;
const TOKEN68_CHAR = /[A-Za-z0-9\-._~+/]/;

export function parseWwwAuthenticate(header: string | null | undefined): AuthChallenge[] {
  if (!header) return [];
  const s = header;
  let i = 0;
  const challenges: AuthChallenge[] = [];

  const skipWs = () => {
    while (i < s.length && (s[i] === " " || s[i] === "\t")) i++;
  };
  const skipWsAndCommas = () => {
    while (i < s.length && (s[i] === " " || s[i] === "\t" || s[i] === ",")) i++;
  };
  const readToken = (): string => {
    const start = i;
    while (i < s.length && TCHAR.test(s[i]!)) i++;
    return s.slice(start, i);
  };
  const readQuoted = (): string => {
    // s[i] === '"'
    i++;
    let out = "";
    while (i < s.length) {
      const ch = s[i]!;
      if (ch === "\\" && i + 1 < s.length) {
        out += s[i + 1];
        i += 2;
      } else if (ch === '"') {
        i++;
        return out;
      } else {
        out += ch;
        i++;
      }
    }
    return out; // unterminated: take what there is
  };
  // Is the text at i `token [ws] "="` (an auth-param) rather than a new scheme or a token68?
  const atParam = (): boolean => {
    let j = i;
    while (j < s.length && TCHAR.test(s[j]!)) j++;
    if (j === i) return false;
    while (j < s.length && (s[j] === " " || s[j] === "\t")) j++;
    if (s[j] !== "=") return false;
    // token68 may end in '=' padding: `abc==` or `abc=` followed by end/comma is token68-ish, but a
    // parameter needs a value after '='. `name=` followed by end is treated as an empty parameter.
    return s[j + 1] !== "=";
  };

  while (i < s.length) {
    skipWsAndCommas();
    if (i >= s.length) break;
    const scheme = readToken();
    if (scheme === "") {
      // Garbage: skip one character and look for the next challenge.
      i++;
      continue;
    }
    const params: Record<string, string> = {};
    let token68: string | undefined;
    skipWs();
    if (i < s.length && s[i] !== "," && !atParam()) {
      // token68
      const start = i;
      while (i < s.length && TOKEN68_CHAR.test(s[i]!)) i++;
      while (i < s.length && s[i] === "=") i++;
      if (i > start) token68 = s.slice(start, i);
    } else {
      for (;;) {
        const save = i;
        skipWsAndCommas();
        if (i >= s.length || !atParam()) {
          // Either the end or the next challenge's scheme.
          if (i < s.length) i = save;
          break;
        }
        const name = readToken().toLowerCase();
        skipWs();
        i++; // '='
        skipWs();
        let value: string;
        if (s[i] === '"') value = readQuoted();
        else {
          const start = i;
          while (i < s.length && s[i] !== "," && s[i] !== " " && s[i] !== "\t") i++;
          value = s.slice(start, i);
        }
        if (!(name in params)) params[name] = value;
        skipWs();
        if (i < s.length && s[i] !== ",") {
          // Junk after a value: skip to the next comma.
          while (i < s.length && s[i] !== ",") i++;
        }
      }
    }
    challenges.push({ scheme: scheme.toLowerCase(), params, token68 });
    skipWs();
    // Move past separators before the next scheme.
    skipWsAndCommas();
  }
  return challenges;
}
