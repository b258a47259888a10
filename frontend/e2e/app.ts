/**
 * The real app for the browser tests, started once for the whole run (globalSetup): `serve run` on
 * loopback, on a free port, with a test config derived from the repository's serve_config.yaml (a token,
 * a voices folder with a `narrator` voice made by espeak-ng, replies capped at 6 s, history in a
 * temporary folder). Ray + Serve take 30–90 s to start on a small machine; `/readyz` says when.
 *
 * Ports are chosen when the Playwright config is loaded and kept in the environment, so the config,
 * globalSetup and every worker agree on them. `ports.gateway` is reserved for the API Gateway
 * emulator (see the comment in `startApp`), `ports.oidc` for the Cognito stand-in (`OIDC`).
 *
 * Everything started here runs in its own session (setsid); stopping sends Ctrl-C to `serve run`
 * (which shuts down Serve and the Ray cluster it started), then kills whatever is still in that session,
 * and checks that nothing is left.
 *
 * `CSM_E2E_SERVE_URL=http://127.0.0.1:8000 CSM_E2E_TOKEN=...` runs the tests against an app that is
 * already running instead (it needs a `narrator` voice and a token for the tests to pass as written).
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { espeak, writeWav } from "./wav";

export const FRONTEND_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO_ROOT = resolve(FRONTEND_DIR, "..");
export const RESULTS_DIR = join(FRONTEND_DIR, "test-results");

/** The shared secret the test app requires (`?token=` on the socket). */
export const APP_TOKEN = process.env.CSM_E2E_TOKEN ?? "e2e-secret";
/** The reply cap the tests' app runs with (`limits.max_reply_seconds`). */
export const MAX_REPLY_SECONDS = 6;

const PICK_PORT = "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})";

function reservePort(name: string): number {
  if (!process.env[name]) process.env[name] = execFileSync(process.execPath, ["-e", PICK_PORT]).toString().trim();
  return Number(process.env[name]);
}

/** Free loopback ports, the same in every process of one run. */
export const ports = {
  serve: reservePort("CSM_E2E_SERVE_PORT"),
  gateway: reservePort("CSM_E2E_GATEWAY_PORT"),
  management: reservePort("CSM_E2E_MANAGEMENT_PORT"), // the gateway's @connections, where the ingress posts
  oidc: reservePort("CSM_E2E_OIDC_PORT"),
};

/** The bridge's own credential (the users' token does not open /bridge/*) and where it posts replies. */
const BRIDGE_TOKEN = "e2e-bridge-secret";
const BRIDGE_CALLBACK_URL = `http://127.0.0.1:${ports.management}/local`;

const external = process.env.CSM_E2E_SERVE_URL;
/** Where the page is loaded from (the Serve app's ingress serves frontend/dist at `/`). */
export const serveUrl = external ?? `http://127.0.0.1:${ports.serve}`;

/** The user pool the gateway's authorizer also accepts: devtools.local_oidc, a Cognito stand-in. Its access
 * tokens last 20 s, so the page's own refresh (at half of that) runs within the sign-in test. */
export const OIDC = {
  url: `http://127.0.0.1:${ports.oidc}`,
  region: "eu-west-1",
  poolId: "eu-west-1_e2e",
  clientId: "e2e-page",
  user: { name: "alice", password: "e2e-wonderland" },
  accessTokenSeconds: 20,
};

export interface Service {
  name: string;
  pid: number;
  stop(): Promise<void>;
}

interface ServiceOptions {
  name: string;
  command: string;
  args: string[];
  cwd: string;
  env: NodeJS.ProcessEnv;
  /** Polled until it answers 200 and `ready(body)` holds (JSON)... */
  readyUrl?: string;
  ready?: (body: unknown) => boolean;
  /** ...or until something accepts connections on this loopback port. */
  readyPort?: number;
  timeoutMs: number;
  logFile: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Process ids whose session is `sid` (everything a setsid'ed service started, Ray's workers included). */
export function sessionMembers(sid: number): number[] {
  const found: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" "); // state ppid pgrp session ...
      if (Number(fields[3]) === sid && fields[0] !== "Z") found.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

function killSession(sid: number): void {
  for (const pid of sessionMembers(sid)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
}

const running = new Set<number>();
// Last resort if the runner dies without its teardown: leave no Ray cluster behind.
process.on("exit", () => running.forEach(killSession));

function tail(file: string, lines = 40): string {
  try {
    return readFileSync(file, "utf8").split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

async function isReady(opts: ServiceOptions): Promise<boolean> {
  try {
    if (opts.readyUrl !== undefined) {
      const res = await fetch(opts.readyUrl, { signal: AbortSignal.timeout(5000) });
      return res.ok && (opts.ready?.(await res.json()) ?? true);
    }
    if (opts.readyPort !== undefined) {
      const port = opts.readyPort;
      return await new Promise<boolean>((resolve) => {
        const socket = connect({ host: "127.0.0.1", port }, () => {
          socket.end();
          resolve(true);
        });
        socket.on("error", () => resolve(false));
      });
    }
    return true;
  } catch {
    return false; // not listening yet
  }
}

/** Start a long-running process in its own session and wait until it reports ready. */
export async function startService(opts: ServiceOptions): Promise<Service> {
  const log = openSync(opts.logFile, "a");
  const child: ChildProcess = spawn(opts.command, opts.args, {
    cwd: opts.cwd,
    env: opts.env,
    detached: true, // setsid: its own session and process group
    stdio: ["ignore", log, log],
  });
  closeSync(log);
  const pid = child.pid;
  if (pid === undefined) throw new Error(`${opts.name}: could not start ${opts.command}`);
  running.add(pid);
  let exited: number | null = null;
  child.on("exit", (code, signal) => {
    exited = code ?? (signal ? 128 : 1);
  });
  const exit = new Promise<void>((r) => child.once("exit", () => r()));

  const stop = async (): Promise<void> => {
    if (exited === null) {
      try {
        process.kill(pid, "SIGINT"); // serve run's Ctrl-C: shut down Serve and its Ray cluster
      } catch {
        // gone
      }
      await Promise.race([exit, sleep(30_000)]);
    }
    for (let i = 0; i < 50 && sessionMembers(pid).length > 0; i++) {
      killSession(pid);
      await sleep(200);
    }
    running.delete(pid);
    const left = sessionMembers(pid);
    if (left.length > 0) throw new Error(`${opts.name}: processes still running after stop: ${left.join(", ")}`);
  };

  const deadline = Date.now() + opts.timeoutMs;
  for (;;) {
    if (exited !== null) {
      await stop();
      throw new Error(`${opts.name} exited (${exited}) before it was ready; its log ends:\n${tail(opts.logFile)}`);
    }
    if (await isReady(opts)) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`${opts.name} was not ready after ${opts.timeoutMs / 1000} s; its log ends:\n${tail(opts.logFile)}`);
    }
    await sleep(1000);
  }
  return { name: opts.name, pid, stop };
}

/** The Cognito stand-in, with the page's own URL as its app client's callback and sign-out URL. */
function startOidc(serveUrl: string, work: string): Promise<Service> {
  return startService({
    name: "oidc",
    command: join(REPO_ROOT, ".venv", "bin", "python"),
    args: [
      "-m",
      "devtools.local_oidc",
      ...["--port", String(ports.oidc), "--region", OIDC.region, "--pool-id", OIDC.poolId],
      ...["--client-id", OIDC.clientId, "--callback-url", `${serveUrl.replace(/\/+$/, "")}/`],
      ...["--user", `${OIDC.user.name}:${OIDC.user.password}`, "--access-token-seconds", String(OIDC.accessTokenSeconds)],
    ],
    cwd: REPO_ROOT,
    env: process.env,
    readyUrl: `${OIDC.url}/.well-known/openid-configuration`,
    timeoutMs: 60_000,
    logFile: join(work, "oidc.log"),
  });
}

/** The AWS path, locally: the API Gateway emulator running the real Lambda handlers (the authorizer on
 * `$connect`, as deployed) in front of Serve (the "gateway" project routes the page through it with
 * ?endpoint=). The authorizer takes the shared token and the stand-in pool's JWTs. */
function startGateway(serveUrl: string, work: string): Promise<Service> {
  return startService({
    name: "gateway",
    command: join(REPO_ROOT, ".venv", "bin", "python"),
    args: [
      "-m",
      "devtools.local_gateway",
      ...["--port", String(ports.gateway), "--serve-url", serveUrl, "--token", APP_TOKEN],
      ...["--bridge-token", BRIDGE_TOKEN, "--management-port", String(ports.management), "--authorizer"],
    ],
    cwd: REPO_ROOT,
    env: {
      ...process.env,
      // boto3 signs the bridge's error posts to the emulator's own @connections endpoint.
      AWS_ACCESS_KEY_ID: "testing",
      AWS_SECRET_ACCESS_KEY: "testing",
      AWS_DEFAULT_REGION: "us-east-1",
      COGNITO_USER_POOL_ID: OIDC.poolId,
      COGNITO_CLIENT_ID: OIDC.clientId,
      COGNITO_REGION: OIDC.region,
      COGNITO_JWKS_URL: `${OIDC.url}/.well-known/jwks.json`,
    },
    readyPort: ports.gateway,
    timeoutMs: 60_000,
    logFile: join(work, "gateway.log"),
  });
}

/** Start the app (and whatever else the tests need); returns the function that stops it all. */
export async function startApp(): Promise<() => Promise<void>> {
  if (external) {
    const res = await fetch(`${external}/readyz`);
    if (!res.ok) throw new Error(`CSM_E2E_SERVE_URL=${external} is not ready: ${res.status}`);
    const work = mkdtempSync(join(tmpdir(), "csm-e2e-"));
    const oidc = await startOidc(external, work);
    const gateway = await startGateway(external, work).catch(async (e) => {
      await oidc.stop();
      throw e;
    });
    return async () => {
      await gateway.stop();
      await oidc.stop();
      rmSync(work, { recursive: true, force: true });
    };
  }
  const serveBin = join(REPO_ROOT, ".venv", "bin", "serve");
  if (!existsSync(serveBin)) throw new Error(`${serveBin} is missing: run \`make venv\` first`);
  // A short path: Ray keeps its sockets under RAY_TMPDIR, and socket paths are limited to ~107 bytes.
  const work = mkdtempSync(join(tmpdir(), "csm-e2e-"));
  const voices = join(work, "voices");
  mkdirSync(voices);
  writeWav(join(voices, "narrator.wav"), espeak("This is my voice."));
  writeFileSync(join(voices, "narrator.txt"), "This is my voice.");
  const config = join(work, "serve_config.yaml");
  const overrides = {
    http_options: { host: "127.0.0.1", port: ports.serve },
    args: {
      generator: { max_slots: 12 },
      ingress: {
        token: APP_TOKEN,
        bridge_token: BRIDGE_TOKEN,
        bridge_callback_url: BRIDGE_CALLBACK_URL,
        voices_dir: voices,
        history_dir: join(work, "history"),
        max_conversations: 10,
        limits: { max_reply_seconds: MAX_REPLY_SECONDS },
      },
    },
  };
  execFileSync(join(REPO_ROOT, ".venv", "bin", "python"), [join(FRONTEND_DIR, "e2e", "serve_config.py"), join(REPO_ROOT, "serve_config.yaml"), config, JSON.stringify(overrides)]);
  const logFile = join(work, "serve.log");
  const services: Service[] = [];
  const stopAll = async () => {
    const errors: unknown[] = [];
    for (const s of services.reverse()) await s.stop().catch((e) => errors.push(e));
    mkdirSync(RESULTS_DIR, { recursive: true });
    if (existsSync(logFile)) copyFileSync(logFile, join(RESULTS_DIR, "serve.log"));
    for (const name of ["gateway.log", "oidc.log"]) {
      if (existsSync(join(work, name))) copyFileSync(join(work, name), join(RESULTS_DIR, name));
    }
    rmSync(work, { recursive: true, force: true });
    if (errors.length) throw errors[0];
  };
  try {
    services.push(
      await startService({
        name: "serve run",
        command: join(REPO_ROOT, ".venv", "bin", "serve"),
        args: ["run", config],
        cwd: REPO_ROOT,
        env: {
          ...process.env,
          RAY_TMPDIR: work,
          RAY_USAGE_STATS_ENABLED: "0",
          // Ray starts its workers at nice 15: below the browser on the same cores, they would lag.
          RAY_worker_niceness: "0",
          // The Lambda bridge's boto3 client signs its posts to a local @connections stand-in.
          AWS_ACCESS_KEY_ID: "testing",
          AWS_SECRET_ACCESS_KEY: "testing",
          AWS_DEFAULT_REGION: "us-east-1",
        },
        readyUrl: `${serveUrl}/readyz`,
        ready: (body) => (body as { ready?: boolean }).ready === true,
        timeoutMs: 240_000,
        logFile,
      }),
    );
    services.push(await startOidc(serveUrl, work));
    services.push(await startGateway(serveUrl, work));
  } catch (e) {
    await stopAll().catch(() => {});
    throw e;
  }
  return stopAll;
}
