#!/usr/bin/env node
// A gRPC client that knows no .proto file talks to dmapin-server and a dmapin-agent through
// server reflection only (@grpc/grpc-js + grpc-reflection-js, see lib/reflect_client.js):
//   - lists the services of the server and of the agent,
//   - resolves dmapin.v1.Admin's methods (request/response types, streaming),
//   - calls Admin/SetPolicy, Admin/GetPolicy, Admin/ListPolicies and Admin/ListNodes with JSON,
//     and NodeAgent/GetNodeStatus on the agent,
//   - checks that a bad call comes back as a gRPC status, and the health service answers.
//
// usage: grpc_reflection_check.js --server=HOST:PORT --agent=HOST:PORT --node=NAME
'use strict';

const assert = require('assert');
const { ReflectClient, eventually, grpc } = require('./lib/reflect_client');

const args = Object.fromEntries(process.argv.slice(2).map((a) => {
  const m = /^--([a-z_]+)=(.*)$/.exec(a);
  if (!m) throw new Error(`bad argument ${a}`);
  return [m[1], m[2]];
}));

let checks = 0;
function ok(msg) {
  checks++;
  process.stdout.write(`ok: ${msg}\n`);
}

async function main() {
  const server = await ReflectClient.connect(args.server);
  const agent = await ReflectClient.connect(args.agent);

  // Services, through reflection.
  const serverServices = await server.services();
  for (const s of ['dmapin.v1.Admin', 'dmapin.v1.Control', 'grpc.health.v1.Health',
    'grpc.reflection.v1alpha.ServerReflection']) {
    assert(serverServices.includes(s), `server lists ${JSON.stringify(serverServices)}, no ${s}`);
  }
  ok(`server services: ${serverServices.join(', ')}`);
  const agentServices = await agent.services();
  for (const s of ['dmapin.v1.NodeAgent', 'grpc.health.v1.Health']) {
    assert(agentServices.includes(s), `agent lists ${JSON.stringify(agentServices)}, no ${s}`);
  }
  ok(`agent services: ${agentServices.join(', ')}`);

  // Admin's methods, resolved from the descriptors.
  const methods = await server.methods('dmapin.v1.Admin');
  const want = {
    SetPolicy: ['dmapin.v1.SetPolicyRequest', 'dmapin.v1.Policy', false],
    ListNodes: ['dmapin.v1.ListNodesRequest', 'dmapin.v1.ListNodesResponse', false],
    CreateIntent: ['dmapin.v1.CreateIntentRequest', 'dmapin.v1.CreateIntentResponse', false],
    WatchEvents: ['dmapin.v1.WatchEventsRequest', 'dmapin.v1.Event', true],
  };
  for (const [name, [req, res, stream]] of Object.entries(want)) {
    const m = methods[name];
    assert(m, `Admin has no method ${name}: ${Object.keys(methods)}`);
    assert.strictEqual(m.requestType, req, `${name} request type`);
    assert.strictEqual(m.responseType, res, `${name} response type`);
    assert.strictEqual(m.responseStream, stream, `${name} server streaming`);
  }
  ok(`Admin has ${Object.keys(methods).length} methods: ${Object.keys(methods).join(', ')}`);
  const control = await server.methods('dmapin.v1.Control');
  assert(Object.values(control).some((m) => m.requestStream && m.responseStream),
    `Control has no bidirectional stream: ${JSON.stringify(control)}`);
  ok('Control has a bidirectional stream method');

  // Admin/SetPolicy with JSON (proto3 JSON names, uint64 as strings, a map).
  const policy = await server.call('dmapin.v1.Admin', 'SetPolicy', {
    policy: {
      name: 'reflection-test', nodeSelector: { pool: 'reflect' }, pinnedBytesBudget: '68719476736',
      maxRegionsPerNode: '4096', deny: [{ key: 'tenant', values: ['red'] }],
      ebusyRetry: { initialBackoffMs: '5', maxBackoffMs: '300000', jitterPercent: 20 },
    },
  });
  assert.strictEqual(policy.name, 'reflection-test');
  assert.deepStrictEqual(policy.nodeSelector, { pool: 'reflect' });
  assert.strictEqual(policy.pinnedBytesBudget, '68719476736');
  assert.strictEqual(policy.deny[0].values[0], 'red');
  assert(Number(policy.revision) >= 1, `revision ${policy.revision}`);
  assert(policy.updateTime, 'no update_time');
  ok(`SetPolicy stored revision ${policy.revision}: ${JSON.stringify(policy)}`);
  const got = await server.call('dmapin.v1.Admin', 'GetPolicy', { name: 'reflection-test' });
  assert.strictEqual(got.revision, policy.revision);
  const list = await server.call('dmapin.v1.Admin', 'ListPolicies', {});
  assert(list.policies.some((p) => p.name === 'reflection-test'));
  ok('GetPolicy and ListPolicies return it');

  // Admin/ListNodes: the agent's node, connected, with its labels.
  const node = await eventually(async () => {
    const { nodes } = await server.call('dmapin.v1.Admin', 'ListNodes', {});
    return nodes.find((n) => n.name === args.node && n.connection === 'CONNECTION_STATE_CONNECTED');
  });
  assert(node, `ListNodes never showed ${args.node} connected`);
  assert.strictEqual(node.backend, 'sim');
  assert.strictEqual(typeof node.labels, 'object');
  ok(`ListNodes: ${JSON.stringify(node)}`);

  // The agent's own API, same way.
  const status = await agent.call('dmapin.v1.NodeAgent', 'GetNodeStatus', {});
  assert.strictEqual(status.nodeName, args.node);
  assert.strictEqual(status.backend, 'sim');
  ok(`NodeAgent/GetNodeStatus: node ${status.nodeName}, backend ${status.backend}, version ${status.version}`);

  // Errors are statuses: an unknown policy, a bad intent.
  await assert.rejects(server.call('dmapin.v1.Admin', 'GetPolicy', { name: 'no-such-policy' }),
    (e) => e.code === grpc.status.NOT_FOUND);
  await assert.rejects(server.call('dmapin.v1.Admin', 'CreateIntent', { kind: 'INTENT_KIND_UNSPECIFIED' }),
    (e) => e.code === grpc.status.INVALID_ARGUMENT);
  ok('errors come back as NOT_FOUND / INVALID_ARGUMENT');
  await server.call('dmapin.v1.Admin', 'DeletePolicy', { name: 'reflection-test' });
  ok('DeletePolicy');

  // Health, resolved through reflection too (grpc.health.v1 is what Kubernetes' gRPC probes call).
  for (const [who, c] of [['server', server], ['agent', agent]]) {
    const h = await c.call('grpc.health.v1.Health', 'Check', { service: '' });
    assert.strictEqual(h.status, 'SERVING', `${who} health ${JSON.stringify(h)}`);
  }
  ok('grpc.health.v1.Health/Check: SERVING on both' + (server.builtin.size
    ? ' (reflection has no descriptor for grpc.health.v1 in gRPC C++: the built-in definition was used)' : ''));
  for (const c of [server, agent]) {
    assert(!c.builtin.has('dmapin.v1.Admin') && !c.builtin.has('dmapin.v1.NodeAgent'));
  }

  server.close();
  agent.close();
  process.stdout.write(`${checks} passed, 0 failed\n`);
}

main().then(() => process.exit(0), (e) => {
  process.stdout.write(`FAIL: ${e.stack || e}\n`);
  process.exit(1);
});
