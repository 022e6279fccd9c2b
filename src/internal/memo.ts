/**
 * Remembering results for the life of the process: host facts (the accelerator, QEMU's version,
 * digests of the guest assets) are found out once. A rejected promise is forgotten, so the next
 * call tries again.
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
