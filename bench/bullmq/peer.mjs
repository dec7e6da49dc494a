// BullMQ's side of `runledger bench --peer bullmq`: one phase of the bench's
// workload, run by BullMQ's own Queue and Worker against the redis-server the
// bench started, then one JSON line on stdout. The bench reads the server's
// memory, CPU and command counts around each phase itself, as it does for
// runledger, so both sides are measured by the same code.
//
//   node peer.mjs '{"port": 6379, "phase": "lifecycle", "queue": "bench", "runs": 20000, "workers": 4}'
//
// Phases (the same as runledger's, see src/bin/runledger/bench/peer.rs):
//   enqueue-single  `runs` jobs, one Queue.add at a time       -> {"elapsed_s"}
//   enqueue-batched `runs` jobs, Queue.addBulk of 1000 at a time -> {"elapsed_s"}
//   lifecycle       as BullMQ's docs recommend: ONE Worker of `concurrency: workers`
//                   takes the queue's `runs` jobs; each writes 3 `job.log` lines
//                   (kept per job, like runledger's per-run stream), then completes
//                                                              -> {"elapsed_s"}
//   lifecycle-progress  the earlier harness, kept as a second row: `workers`
//                   Workers of concurrency 1, 3 `updateProgress` calls per job
//                                                              -> {"elapsed_s"}
//   idle-latency    one idle Worker of `concurrency: workers`; `runs` single adds
//                   2 ms apart; the time from each add to its processor starting
//                                                              -> {"latencies_ms": [...]}
import { Queue, Worker } from 'bullmq';

const spec = JSON.parse(process.argv[2] ?? '{}');
const { port, phase, queue: name, runs } = spec;
const workers = spec.workers ?? 4;
if (!port || !phase || !name || !runs) {
  console.error('peer.mjs: needs {"port", "phase", "queue", "runs"} as its one argument');
  process.exit(2);
}
const connection = { host: '127.0.0.1', port, maxRetriesPerRequest: null };
// The same ~200 bytes of metadata and ~70-byte event payloads as runledger's bench.
const PAD = 'lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation';
const job = (i) => ({
  name: 'bench-agent',
  data: { n: i, user: 'bench', text: PAD.slice(0, 150) },
  // runledger's priorities 0..9, highest first; BullMQ's 1 is its highest.
  opts: { priority: 1 + Math.floor(Math.random() * 10) },
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function enqueueSingle(queue) {
  const start = process.hrtime.bigint();
  for (let i = 0; i < runs; i++) {
    const j = job(i);
    await queue.add(j.name, j.data, j.opts);
  }
  return { elapsed_s: Number(process.hrtime.bigint() - start) / 1e9 };
}

async function enqueueBatched(queue) {
  const start = process.hrtime.bigint();
  for (let i = 0; i < runs; i += 1000) {
    const batch = [];
    for (let k = i; k < Math.min(runs, i + 1000); k++) batch.push(job(k));
    await queue.addBulk(batch);
  }
  return { elapsed_s: Number(process.hrtime.bigint() - start) / 1e9 };
}

// Starts `count` Workers of `concurrency` each whose processor is `work`;
// resolves once `runs` jobs completed, with the Workers closed.
async function runWorkers(work, { count, concurrency }, onReady) {
  let done = 0;
  let finish;
  const all = new Promise((r) => (finish = r));
  const pool = [];
  for (let w = 0; w < count; w++) {
    const worker = new Worker(name, work, { connection, concurrency, autorun: false });
    worker.on('completed', () => {
      done += 1;
      if (done === runs) finish();
    });
    worker.on('failed', (_job, err) => {
      console.error(`peer.mjs: a job failed: ${err}`);
      process.exit(1);
    });
    pool.push(worker);
  }
  await Promise.all(pool.map((w) => w.waitUntilReady()));
  const start = process.hrtime.bigint();
  pool.forEach((w) => w.run());
  const extra = onReady ? await onReady() : undefined;
  await all;
  const elapsed_s = Number(process.hrtime.bigint() - start) / 1e9;
  await Promise.all(pool.map((w) => w.close()));
  return { elapsed_s, extra };
}

// One Worker, `concurrency: workers`: how BullMQ's docs scale a worker.
const idiomatic = { count: 1, concurrency: workers };

async function lifecycle() {
  const pad = PAD.slice(0, 70);
  const { elapsed_s } = await runWorkers(async (j) => {
    await j.log(JSON.stringify({ step: 1, text: pad }));
    await j.log(JSON.stringify({ step: 2, text: pad }));
    await j.log(JSON.stringify({ step: 3, text: pad }));
    return null;
  }, idiomatic);
  return { elapsed_s };
}

async function lifecycleProgress() {
  const pad = PAD.slice(0, 70);
  const { elapsed_s } = await runWorkers(async (j) => {
    await j.updateProgress({ step: 1, text: pad });
    await j.updateProgress({ step: 2, text: pad });
    await j.updateProgress({ step: 3, text: pad });
    return null;
  }, { count: workers, concurrency: 1 });
  return { elapsed_s };
}

async function idleLatency(queue) {
  const sent = new Map();
  const latencies = [];
  const { extra } = await runWorkers(
    async (j) => {
      const at = process.hrtime.bigint();
      const from = sent.get(j.data.n);
      if (from !== undefined) latencies.push(Number(at - from) / 1e6);
    },
    idiomatic,
    async () => {
      await sleep(300);
      for (let i = 0; i < runs; i++) {
        const j = job(i);
        const at = process.hrtime.bigint();
        sent.set(i, at);
        await queue.add(j.name, j.data, j.opts);
        await sleep(2);
      }
    },
  );
  void extra;
  latencies.sort((a, b) => a - b);
  return { latencies_ms: latencies };
}

const queue = new Queue(name, { connection });
let out;
try {
  switch (phase) {
    case 'enqueue-single': out = await enqueueSingle(queue); break;
    case 'enqueue-batched': out = await enqueueBatched(queue); break;
    case 'lifecycle': out = await lifecycle(); break;
    case 'lifecycle-progress': out = await lifecycleProgress(); break;
    case 'idle-latency': out = await idleLatency(queue); break;
    default:
      console.error(`peer.mjs: unknown phase ${phase}`);
      process.exit(2);
  }
} finally {
  await queue.close();
}
console.log(JSON.stringify(out));
process.exit(0);
