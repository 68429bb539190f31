#!/usr/bin/env node
// Drives a local dmapin fleet (one dmapin-server, N dmapin-agents on the sim backend) through
// gRPC reflection only (no .proto file), so that every series the dashboards and alerts use has
// data:
//   - policies with pinned-bytes budgets for the pools (budget series),
//   - on every agent: a memlock-limited context and an unlimited one, two containers,
//   - regions registered through the server (intents -> decisions -> results) and directly,
//   - DMA mappings, a few failing calls (rpc error series),
//   - an UNREGISTER intent of a still-mapped region on the first node, which the agent answers
//     EBUSY and the server keeps retrying (retrying intents, EBUSY retry counters),
// then keeps a light churn (map/unmap/translate, a register/unregister intent pair) going until
// SIGTERM/SIGINT or --churn_seconds, so rates are non-zero while Prometheus scrapes.
//
// usage: fleet_workload.js --server=HOST:PORT --agents=NAME=unix:PATH,... [--churn_seconds=N]
// Prints "workload: setup done" once the fleet is in its steady state.
'use strict';

const { ReflectClient, eventually } = require('./lib/reflect_client');

const MiB = 1024 * 1024;
const PAGE = 65536; // the agents' default sim page size
const BASE = 0x10000000;

function parseArgs(argv) {
  const args = { churn_seconds: 0 };
  for (const a of argv) {
    const m = /^--([a-z_]+)=(.*)$/.exec(a);
    if (!m) throw new Error(`bad argument ${a}`);
    args[m[1]] = m[2];
  }
  if (!args.server || !args.agents) throw new Error('need --server and --agents');
  args.agents = args.agents.split(',').map((s) => {
    const [name, target] = s.split('=');
    return { name, target };
  });
  args.churn_seconds = Number(args.churn_seconds);
  return args;
}

function log(msg) {
  process.stdout.write(`workload: ${msg}\n`);
}

async function expectError(promise, what) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  throw new Error(`${what}: expected an error, got success`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const server = await ReflectClient.connect(args.server);
  const ADMIN = 'dmapin.v1.Admin';
  const AGENT = 'dmapin.v1.NodeAgent';
  const agents = [];
  for (const a of args.agents) agents.push({ ...a, client: await ReflectClient.connect(a.target) });

  const connected = await eventually(async () => {
    const { nodes } = await server.call(ADMIN, 'ListNodes', {});
    const up = nodes.filter((n) => n.connection === 'CONNECTION_STATE_CONNECTED').length;
    return up === agents.length;
  });
  if (!connected) throw new Error('the agents did not all connect to the server');
  log(`${agents.length} agents connected`);

  // Budgets: every node label pool=X gets a policy (see the test's --node_labels).
  await server.call(ADMIN, 'SetPolicy', {
    policy: {
      name: 'pool-a', nodeSelector: { pool: 'a' }, pinnedBytesBudget: String(64 * MiB),
      ebusyRetry: { initialBackoffMs: '50', maxBackoffMs: '500', jitterPercent: 10 },
    },
  });
  await server.call(ADMIN, 'SetPolicy', {
    policy: { name: 'pool-b', nodeSelector: { pool: 'b' }, pinnedBytesBudget: String(32 * MiB) },
  });

  // What a VMM does on each node: contexts and containers.
  for (const a of agents) {
    await a.client.call(AGENT, 'CreateContext', { name: 'vm1', memlockLimitBytes: String(64 * MiB) });
    await a.client.call(AGENT, 'CreateContext', { name: 'vm2', memlockUnlimited: true, capIpcLock: true });
    await a.client.call(AGENT, 'CreateContainer', { name: 'vm1/vfio-0' });
    await a.client.call(AGENT, 'CreateContainer', { name: 'vm2/vfio-0' });
  }

  // Registers through the central service and waits for the intent to hold.
  async function registerViaServer(node, context, container, ua, size) {
    const { intent } = await server.call(ADMIN, 'CreateIntent', {
      kind: 'INTENT_KIND_REGISTER', node, context, container, ua: String(ua), size: String(size),
      labels: { tenant: 'blue' },
    });
    const ok = await eventually(async () =>
      (await server.call(ADMIN, 'GetIntent', { id: intent.id })).state === 'INTENT_STATE_SATISFIED');
    if (!ok) {
      const now = await server.call(ADMIN, 'GetIntent', { id: intent.id });
      throw new Error(`register intent on ${node} did not hold: ${JSON.stringify(now)}`);
    }
    return intent.id;
  }

  for (const [i, a] of agents.entries()) {
    await registerViaServer(a.name, 'vm1', 'vm1/vfio-0', BASE, (4 + i) * MiB);
    await registerViaServer(a.name, 'vm1', 'vm1/vfio-0', BASE + 16 * MiB, MiB);
    // Directly at the agent, as a VMM does on the Unix socket.
    await a.client.call(AGENT, 'RegisterRegion', {
      container: 'vm2/vfio-0', context: 'vm2', ua: String(BASE), size: String(2 * MiB),
    });
    await a.client.call(AGENT, 'MapDma', {
      container: 'vm1/vfio-0', iova: '0', ua: String(BASE), size: String(4 * PAGE),
    });
    await a.client.call(AGENT, 'MapDma', {
      container: 'vm2/vfio-0', iova: '0', ua: String(BASE), size: String(2 * PAGE),
    });
    // Failing calls: an address nothing registered, an unknown container.
    await expectError(a.client.call(AGENT, 'MapDma', {
      container: 'vm1/vfio-0', iova: String(64 * MiB), ua: String(BASE + 512 * MiB), size: String(PAGE),
    }), 'MapDma of unregistered memory');
    await expectError(a.client.call(AGENT, 'GetContainer', { name: 'no-such-container' }),
      'GetContainer of an unknown container');
  }
  // Over budget: refused at admission (RESOURCE_EXHAUSTED), nothing is sent.
  const refused = await expectError(server.call(ADMIN, 'CreateIntent', {
    kind: 'INTENT_KIND_REGISTER', node: agents[0].name, context: 'vm1', container: 'vm1/vfio-0',
    ua: String(BASE + 256 * MiB), size: String(128 * MiB),
  }), 'an intent over the pool budget');
  log(`over-budget intent refused: ${refused.details}`);

  // EBUSY: unregister a region that vm1/vfio-0 still maps on the first node; the server retries.
  const { intent: busy } = await server.call(ADMIN, 'CreateIntent', {
    kind: 'INTENT_KIND_UNREGISTER', node: agents[0].name, context: 'vm1', container: 'vm1/vfio-0',
    ua: String(BASE), size: String(4 * MiB),
  });
  const retrying = await eventually(async () => {
    const now = await server.call(ADMIN, 'GetIntent', { id: busy.id });
    return now.state === 'INTENT_STATE_RETRYING' && Number(now.attempts) >= 2;
  });
  if (!retrying) {
    throw new Error(`unregister of a mapped region is not retrying: ${JSON.stringify(
      await server.call(ADMIN, 'GetIntent', { id: busy.id }))}`);
  }
  log(`unregister intent ${busy.id} retrying through EBUSY`);
  log('setup done');

  // Churn until told to stop.
  let stop = false;
  const stopNow = () => { stop = true; };
  process.on('SIGTERM', stopNow);
  process.on('SIGINT', stopNow);
  const end = args.churn_seconds > 0 ? Date.now() + args.churn_seconds * 1000 : Infinity;
  let round = 0;
  while (!stop && Date.now() < end) {
    for (const a of agents) {
      const iova = String((1 + (round % 8)) * MiB);
      try {
        await a.client.call(AGENT, 'MapDma', {
          container: 'vm1/vfio-0', iova, ua: String(BASE + 16 * MiB), size: String(PAGE),
        });
        await a.client.call(AGENT, 'Translate', { context: 'vm1', uas: [String(BASE + 16 * MiB)] });
        await a.client.call(AGENT, 'UnmapDma', { container: 'vm1/vfio-0', iova, size: String(PAGE) });
      } catch (e) {
        if (stop) break;
        throw e;
      }
    }
    if (round % 20 === 10) {
      // A register/unregister pair through the server on the last node.
      const node = agents[agents.length - 1].name;
      const ua = BASE + 32 * MiB;
      await server.call(ADMIN, 'CreateIntent', {
        kind: (round % 40 === 10) ? 'INTENT_KIND_REGISTER' : 'INTENT_KIND_UNREGISTER',
        node, context: 'vm1', container: 'vm1/vfio-0', ua: String(ua), size: String(MiB),
      }).catch((e) => log(`churn intent: ${e.details}`));
    }
    round++;
    await new Promise((r) => setTimeout(r, 100));
  }
  log(`stopped after ${round} churn rounds`);
  server.close();
  for (const a of agents) a.client.close();
}

main().then(() => process.exit(0), (e) => {
  process.stderr.write(`workload: FAILED: ${e.stack || e}\n`);
  process.exit(1);
});
