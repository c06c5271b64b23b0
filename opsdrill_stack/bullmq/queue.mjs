// Drives a real BullMQ queue for the tests: the package from npm (package.json), its own
// Lua scripts writing the keys, its own Worker moving jobs between states. Nothing here
// writes a Redis key by hand.
//
//   node queue.mjs ACTION '{"count": 3, ...}'
//
// Connection from the environment (never the command line: it holds the password):
// BULLMQ_REDIS_PORT, BULLMQ_REDIS_PASSWORD, BULLMQ_QUEUE, BULLMQ_PREFIX.
// Prints one JSON line: the action's result and BullMQ's own job counts afterwards.
import { Queue, Worker } from "bullmq";

const connection = {
  host: "127.0.0.1",
  port: Number(process.env.BULLMQ_REDIS_PORT),
  password: process.env.BULLMQ_REDIS_PASSWORD || undefined,
  maxRetriesPerRequest: null,
};
const name = process.env.BULLMQ_QUEUE || "email";
const prefix = process.env.BULLMQ_PREFIX || "bull";
const [action, raw] = process.argv.slice(2);
const args = raw ? JSON.parse(raw) : {};
const STATES = ["wait", "paused", "prioritized", "active", "delayed", "failed", "completed"];

const queue = new Queue(name, { connection, prefix });

function invite(i) {
  return { to: `client-${i}@mailbox.test`, template: "portal-auth" };
}

// Jobs as the application adds them: `ageSeconds` backdates their creation time (the
// `timestamp` option), so a delayed job can be due in the past without waiting for it.
async function add({ count = 1, delay = 0, priority, ageSeconds = 0, attempts = 3 }) {
  const timestamp = Date.now() - Math.round(ageSeconds * 1000);
  const jobs = [];
  for (let i = 0; i < count; i++) {
    const opts = { attempts, timestamp: timestamp + i, removeOnComplete: false };
    if (delay) opts.delay = delay;
    if (priority) opts.priority = priority;
    jobs.push({ name: "portal-invite", data: invite(i), opts });
  }
  for (let i = 0; i < jobs.length; i += 500) await queue.addBulk(jobs.slice(i, i + 500));
  return { added: count };
}

// A worker processes `count` fresh jobs: each fails (an SMTP refusal) or completes.
async function work({ count = 1, fail = false }) {
  await add({ count, attempts: 1 });
  let done = 0;
  const finished = new Promise((resolve) => {
    const worker = new Worker(
      name,
      async () => {
        if (fail) throw new Error("535 5.7.8 authentication failed (a test of opsdrill)");
        return { sent: true };
      },
      { connection, prefix, concurrency: 50 },
    );
    const step = async () => {
      done += 1;
      if (done === count) {
        await worker.close();
        resolve();
      }
    };
    worker.on("failed", step);
    worker.on("completed", step);
  });
  await finished;
  return { processed: done, failed: fail ? done : 0 };
}

// A worker takes `count` jobs and dies mid-job (the process exits without closing): they
// stay active, as after a crash.
async function take({ count = 1 }) {
  await add({ count, attempts: 1 });
  let started = 0;
  await new Promise((resolve) => {
    new Worker(
      name,
      () => {
        started += 1;
        if (started === count) setTimeout(resolve, 200);
        return new Promise(() => {}); // never finishes
      },
      { connection, prefix, concurrency: count, stalledInterval: 3600000 },
    );
  });
  return { active: started, exit: true };
}

const actions = {
  add,
  work,
  take,
  pause: async () => (await queue.pause(), { paused: true }),
  resume: async () => (await queue.resume(), { paused: false }),
  obliterate: async () => (await queue.obliterate({ force: true }), { obliterated: true }),
  counts: async () => ({}),
};

try {
  if (!actions[action]) throw new Error(`unknown action ${action}`);
  const result = await actions[action](args);
  const counts = await queue.getJobCounts(...STATES);
  process.stdout.write(JSON.stringify({ ...result, counts }) + "\n");
  if (result.exit) process.exit(0); // no close: the taken jobs stay active
  await queue.close();
} catch (err) {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
}
