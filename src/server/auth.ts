/** Bearer tokens, compared in constant time. */

import { createHash, timingSafeEqual } from "node:crypto";
import type { IncomingHttpHeaders } from "node:http";

/**
 * Checks `Authorization: Bearer <token>` against the server's token. Both sides are hashed first
 * so that the comparison takes the same time whatever the lengths and contents.
 */
export class TokenCheck {
  readonly #digest: Buffer | undefined;

  /** `token` undefined: every request passes (a loopback server started without --token-file). */
  constructor(token: string | undefined) {
    this.#digest = token === undefined ? undefined : sha256(token);
  }

  get required(): boolean {
    return this.#digest !== undefined;
  }

  allows(headers: IncomingHttpHeaders): boolean {
    if (this.#digest === undefined) return true;
    const header = headers.authorization ?? "";
    const match = /^Bearer[ \t]+(\S+)\s*$/i.exec(header);
    const given = sha256(match?.[1] ?? "");
    // Compare even when the header is malformed, so that its shape takes no other path.
    return timingSafeEqual(given, this.#digest) && match !== null;
  }
}

function sha256(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}
