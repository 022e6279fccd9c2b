/**
 * Remembering results for the life of the process: host facts (the accelerator, QEMU's version,
 * digests of the guest assets) are found out once; an image's default pool is made once. A rejected
 * promise is forgotten, so the next call tries again.
 */

/** `fn` run on the first call; later calls return the first call's result. */
export function once<T>(fn: () => T): () => T {
  let done = false;
  let value: T;
  return () => {
    if (!done) {
      value = fn();
      done = true;
      if (value instanceof Promise) {
        value.catch(() => {
          done = false;
        });
      }
    }
    return value;
  };
}

/** `fn` run once per key (compared with `Map` semantics); a rejected result is forgotten. */
export function memoize<K, V>(fn: (key: K) => Promise<V>): (key: K) => Promise<V> {
  const results = new Map<K, Promise<V>>();
  return (key) => {
    let result = results.get(key);
    if (result === undefined) {
      result = fn(key);
      results.set(key, result);
      result.catch(() => results.delete(key));
    }
    return result;
  };
}

/**
 * A resource made on first use and kept until closed (an image's default pool): `get()` builds it
 * once, a rejected build is forgotten so the next `get()` tries again; `close()` forgets it and
 * closes it if it was built.
 */
export class Lazy<T extends { close(options: { force?: boolean }): Promise<void> }> {
  readonly #build: () => Promise<T>;
  #value: Promise<T> | undefined;

  constructor(build: () => Promise<T>) {
    this.#build = build;
  }

  get(): Promise<T> {
    this.#value ??= this.#build();
    const value = this.#value;
    value.catch(() => {
      if (this.#value === value) this.#value = undefined;
    });
    return value;
  }

  async close(options: { force?: boolean } = {}): Promise<void> {
    const value = this.#value;
    this.#value = undefined;
    if (value !== undefined) await (await value.catch(() => undefined))?.close(options);
  }
}
