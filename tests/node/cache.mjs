// Runs the unmodified @actions/cache against the environment it is given:
//   node --require ./bind.cjs cache.mjs PACKAGE save KEY PATH...
//   node --require ./bind.cjs cache.mjs PACKAGE restore KEY RESTORE_KEYS_JSON PATH...
// PACKAGE is cache6 (@actions/cache 6.3.0) or cache3 (3.3.0). The last stdout line is
// "RESULT <json>": the cache id saveCache returned, or the key restoreCache matched (null on a miss).
// The client turns most failures into warnings; the test asserts what was saved and restored.
const [pkg, command, key, ...rest] = process.argv.slice(2);
const cache = await import(pkg);
let result;
if (command === 'save') {
  result = await cache.saveCache(rest, key);
} else if (command === 'restore') {
  const [restoreKeys, ...paths] = rest;
  result = (await cache.restoreCache(paths, key, JSON.parse(restoreKeys))) ?? null;
} else {
  throw new Error(`unknown command ${command}`);
}
console.log(`RESULT ${JSON.stringify({ result })}`);
