import { startApp } from "./app";

/** Start the app once for the whole run; the returned function is Playwright's global teardown. */
export default async function globalSetup(): Promise<() => Promise<void>> {
  const started = Date.now();
  const stop = await startApp();
  console.log(`app ready in ${((Date.now() - started) / 1000).toFixed(0)} s`);
  return async () => {
    const stopping = Date.now();
    await stop();
    console.log(`app stopped in ${((Date.now() - stopping) / 1000).toFixed(0)} s`);
  };
}
