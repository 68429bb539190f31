#!/usr/bin/env node
// Checks the rendered kustomize overlays (multi-document YAML, as `kubectl kustomize` prints it):
//   1. every object validates offline against its schema: Kubernetes' (npm kubernetes-models,
//      OpenAPI of Kubernetes 1.3x) or the Prometheus Operator's (@kubernetes-models/
//      prometheus-operator). The validators check types, enums, formats and required fields;
//      they do not reject unknown fields (the property checks below read the fields that matter);
//   2. the deployment's properties: the agent DaemonSet (system-node-critical, tolerations,
//      hostPath /dev/vfio /dev/hugepages /var/lib/dmapin/agent /run/dmapin, IPC_LOCK and
//      SYS_RESOURCE, NODE_NAME from spec.nodeName, gRPC probes on the plaintext health port
//      (--health_address, container port "health"; never the mutual-TLS port 7470), RollingUpdate
//      with maxUnavailable and no maxSurge, --server at the server Service), the server
//      StatefulSet (1 replica, PVC, non-root, gRPC probes on its health port, not 7480), mutual
//      TLS on both (--tls_cert_file/--tls_key_file/--tls_ca_file inside mounted volumes, never
//      --insecure; the server's from a Secret, the agent's node certificate from the host and
//      only ca.crt of the CA Secret), Services, no RBAC and no API token,
//      PodMonitor/ServiceMonitor selecting the right pods/ports with the labels the dashboards
//      need, the PrometheusRule equal to deploy/prometheus/dmapin-rules.yaml, the dashboard
//      ConfigMaps (grafana_dashboard: "1") equal to dashboards/*.json, app.kubernetes.io labels;
//      with cert-manager resources (overlay cert-manager): every Certificate issued by an Issuer of
//      the output, the server's mounted Secret from a Certificate naming spiffe://dmapin/server
//      and the host agents dial, the agents' CA Secret from an isCA Certificate, node
//      Certificates naming spiffe://dmapin/node/<name>.
//
// usage: check_manifests.mjs OVERLAY_NAME RENDERED.yaml REPO_ROOT
import fs from 'fs';
import path from 'path';
import YAML from 'yaml';

const [overlay, renderedFile, root] = process.argv.slice(2);
const docs = YAML.parseAllDocuments(fs.readFileSync(renderedFile, 'utf8'))
  .map((d) => d.toJSON()).filter((o) => o);

let checks = 0;
let failures = 0;
function check(cond, msg) {
  checks++;
  if (!cond) {
    failures++;
    process.stdout.write(`FAIL [${overlay}]: ${msg}\n`);
  }
}
// JSON with sorted keys (kustomize reorders mapping keys).
const canonical = (v) => JSON.stringify(v, (k, x) => (x && typeof x === 'object' && !Array.isArray(x)
  ? Object.fromEntries(Object.keys(x).sort().map((key) => [key, x[key]])) : x));
const find = (kind, name) => docs.find((o) => o.kind === kind && (!name || o.metadata.name === name));
const all = (kind) => docs.filter((o) => o.kind === kind);

// --- 1. Schemas --------------------------------------------------------------------------------
// cert-manager's CRDs have no offline schema package here: their required fields by hand.
function certManagerProblems(o) {
  const s = o.spec || {};
  if (o.kind === 'Issuer' || o.kind === 'ClusterIssuer') {
    const kinds = ['selfSigned', 'ca', 'acme', 'vault', 'venafi'].filter((k) => s[k] !== undefined);
    return kinds.length === 1 ? [] : [`needs exactly one issuer type, has ${kinds.join(',') || 'none'}`];
  }
  if (o.kind === 'Certificate') {
    const p = [];
    if (!s.secretName) p.push('no spec.secretName');
    if (!s.issuerRef || !s.issuerRef.name) p.push('no spec.issuerRef.name');
    if (!s.commonName && !(s.dnsNames || []).length && !(s.uris || []).length) p.push('names nothing');
    return p;
  }
  return [`unknown kind ${o.kind}`];
}
function modulePath(apiVersion) {
  if (apiVersion.startsWith('monitoring.coreos.com/')) return `@kubernetes-models/prometheus-operator/${apiVersion}`;
  return `kubernetes-models/${apiVersion}`;
}
for (const o of docs) {
  const where = `${o.kind}/${o.metadata && o.metadata.name}`;
  if (o.apiVersion === 'cert-manager.io/v1') {
    for (const problem of certManagerProblems(o)) check(false, `${where}: ${problem}`);
    checks++;
    continue;
  }
  let Model;
  try {
    Model = (await import(modulePath(o.apiVersion)))[o.kind];
  } catch (e) {
    Model = undefined;
  }
  check(Model, `${where}: no schema for ${o.apiVersion} ${o.kind}`);
  if (!Model) continue;
  try {
    new Model(o).validate();
    checks++;
  } catch (e) {
    check(false, `${where} (${o.apiVersion}) does not validate: ${e.message}`);
  }
}

// --- 2. Properties -----------------------------------------------------------------------------
const ns = find('Namespace');
check(ns, 'no Namespace');
for (const o of docs) {
  const where = `${o.kind}/${o.metadata.name}`;
  const l = o.metadata.labels || {};
  check(l['app.kubernetes.io/name'], `${where}: no app.kubernetes.io/name label`);
  check(l['app.kubernetes.io/part-of'] === 'dmapin', `${where}: app.kubernetes.io/part-of is not dmapin`);
  check(l['app.kubernetes.io/managed-by'] === 'kustomize', `${where}: no app.kubernetes.io/managed-by`);
  check(l['app.kubernetes.io/instance'], `${where}: no app.kubernetes.io/instance (set by the overlay)`);
  if (o.kind !== 'Namespace') check(o.metadata.namespace === ns.metadata.name, `${where}: namespace ${o.metadata.namespace}`);
}
for (const kind of ['Role', 'ClusterRole', 'RoleBinding', 'ClusterRoleBinding']) {
  check(all(kind).length === 0, `unexpected ${kind}: dmapin needs no Kubernetes API access`);
}
for (const sa of all('ServiceAccount')) {
  check(sa.automountServiceAccountToken === false, `ServiceAccount/${sa.metadata.name} mounts a token`);
}

const matches = (selector, labels) => Object.entries(selector || {}).every(([k, v]) => labels[k] === v);
const container = (w) => w.spec.template.spec.containers[0];
const argValue = (c, flag) => {
  const a = (c.args || []).find((x) => x.startsWith(`--${flag}=`));
  return a === undefined ? undefined : a.slice(flag.length + 3);
};
// Mutual TLS of a workload: the three files inside mounted volumes, never --insecure, probes on
// the plaintext health-only port. Returns {file flag: volume} for the caller's own checks.
function checkTls(what, w, tlsPort) {
  const c = container(w);
  const pod = w.spec.template.spec;
  check(!(c.args || []).some((a) => a === '--insecure' || a.startsWith('--insecure=')), `${what} runs --insecure`);
  const volumes = Object.fromEntries((pod.volumes || []).map((v) => [v.name, v]));
  const out = {};
  for (const flag of ['tls_cert_file', 'tls_key_file', 'tls_ca_file']) {
    const file = argValue(c, flag);
    check(file, `${what} has no --${flag}`);
    if (!file) continue;
    const mount = (c.volumeMounts || []).find((m) => path.dirname(file) === m.mountPath);
    check(mount, `${what} --${flag}=${file} is in no mounted volume`);
    if (!mount) continue;
    check(mount.readOnly === true, `${what}: the volume of --${flag} is not mounted read-only`);
    const v = volumes[mount.name];
    check(v && (v.secret || v.hostPath), `${what}: --${flag} is not from a Secret or the host`);
    if (v && v.secret && v.secret.items) {
      check(v.secret.items.some((i) => i.path === path.basename(file)),
        `${what}: --${flag}=${file}: the Secret volume ${mount.name} does not project ${path.basename(file)}`);
    }
    out[flag] = v;
  }
  const health = argValue(c, 'health_address') || '';
  const healthPort = Number(health.split(':').pop());
  const ports = Object.fromEntries((c.ports || []).map((p) => [p.name, p.containerPort]));
  check(health && ports.health === healthPort, `${what} --health_address=${health} is not its container port "health"`);
  check(healthPort !== tlsPort, `${what}: the health port is the mutual-TLS port ${tlsPort}`);
  for (const probe of ['startupProbe', 'livenessProbe', 'readinessProbe']) {
    check(c[probe] && c[probe].grpc && c[probe].grpc.port === healthPort,
      `${what} ${probe} is not a gRPC probe on the health port ${healthPort} (kubelet's probes do not speak TLS)`);
  }
  return out;
}

// The agent DaemonSet.
let agentCaSecret;
let serverTlsSecret;
let agentServerHost;
const ds = find('DaemonSet', 'dmapin-agent');
check(ds, 'no DaemonSet dmapin-agent');
if (ds) {
  const pod = ds.spec.template.spec;
  const c = container(ds);
  const podLabels = ds.spec.template.metadata.labels;
  check(matches(ds.spec.selector.matchLabels, podLabels), 'DaemonSet selector does not match its pods');
  check(podLabels['app.kubernetes.io/name'] === 'dmapin-agent' && podLabels['app.kubernetes.io/component'],
    'agent pods lack app.kubernetes.io/name/component');
  check(pod.priorityClassName === 'system-node-critical', `agent priorityClassName ${pod.priorityClassName}`);
  check((pod.tolerations || []).length > 0, 'agent has no tolerations');
  check(pod.automountServiceAccountToken === false, 'agent pod mounts a service account token');
  check(find('ServiceAccount', pod.serviceAccountName), `agent service account ${pod.serviceAccountName} missing`);
  const hostPaths = Object.fromEntries((pod.volumes || []).filter((v) => v.hostPath).map((v) => [v.hostPath.path, v.name]));
  const mounts = Object.fromEntries((c.volumeMounts || []).map((m) => [m.name, m.mountPath]));
  for (const p of ['/dev/vfio', '/dev/hugepages', '/var/lib/dmapin/agent', '/run/dmapin']) {
    check(hostPaths[p], `agent has no hostPath volume ${p}`);
    check(hostPaths[p] && mounts[hostPaths[p]] === p, `agent does not mount hostPath ${p} at ${p}`);
  }
  check(argValue(c, 'state_dir') === '/var/lib/dmapin/agent', `agent --state_dir ${argValue(c, 'state_dir')}`);
  check(path.dirname(argValue(c, 'uds_path') || '') === '/run/dmapin', `agent --uds_path ${argValue(c, 'uds_path')}`);
  const caps = ((c.securityContext || {}).capabilities || {});
  for (const cap of ['IPC_LOCK', 'SYS_RESOURCE', 'SYS_ADMIN', 'SYS_PTRACE']) check((caps.add || []).includes(cap), `agent lacks capability ${cap}`);
  check(pod.hostPID === true, 'agent does not share the host pid namespace (SO_PEERCRED pids, pidfds, /proc/<vmm>)');
  check((caps.drop || []).includes('ALL'), 'agent does not drop the other capabilities');
  check(!(c.securityContext || {}).privileged, 'agent is privileged');
  const nodeName = (c.env || []).find((e) => e.name === 'NODE_NAME');
  check(nodeName && nodeName.valueFrom && nodeName.valueFrom.fieldRef && nodeName.valueFrom.fieldRef.fieldPath === 'spec.nodeName',
    'agent NODE_NAME is not from the downward API spec.nodeName');
  const tls = checkTls('agent', ds, 7470);
  // A node's certificate is the node's own: from the host, never a Secret every agent shares.
  check(tls.tls_cert_file && tls.tls_cert_file.hostPath && tls.tls_key_file && tls.tls_key_file.hostPath,
    'agent certificate/key are not the node\'s own (hostPath): one shared Secret would let any node claim another');
  const caVolume = tls.tls_ca_file;
  check(caVolume && caVolume.secret && (caVolume.secret.items || []).length > 0 &&
    caVolume.secret.items.every((i) => i.key === 'ca.crt'),
  'agent CA volume is not only ca.crt of a Secret (the CA Secret\'s key must not be mounted)');
  agentCaSecret = caVolume && caVolume.secret && caVolume.secret.secretName;
  const ports = Object.fromEntries((c.ports || []).map((p) => [p.name, p.containerPort]));
  check(ports.grpc === 7470 && ports.metrics === 9470, `agent ports ${JSON.stringify(ports)}`);
  check(argValue(c, 'tcp_address') === '0.0.0.0:7470' && argValue(c, 'metrics_address') === '0.0.0.0:9470',
    'agent --tcp_address/--metrics_address do not match its ports');
  check(c.resources && c.resources.requests && c.resources.requests.cpu && c.resources.requests.memory &&
    c.resources.limits && c.resources.limits.memory, 'agent resources incomplete');
  const us = ds.spec.updateStrategy || {};
  check(us.type === 'RollingUpdate', 'agent updateStrategy is not RollingUpdate');
  check(us.rollingUpdate && us.rollingUpdate.maxUnavailable !== undefined, 'agent has no maxUnavailable');
  check(!us.rollingUpdate || !us.rollingUpdate.maxSurge || us.rollingUpdate.maxSurge === 0 || us.rollingUpdate.maxSurge === '0%',
    'agent has a maxSurge: two agents would share a node');
  // --server names the server Service's gRPC port.
  const server = argValue(c, 'server') || '';
  const [svcHost, svcPort] = server.split(':');
  agentServerHost = svcHost;
  const svc = find('Service', svcHost.split('.')[0]);
  check(svc && svc.spec.clusterIP !== 'None', `agent --server=${server} is not a ClusterIP Service of the output`);
  check(svc && svc.spec.ports.some((p) => p.port === Number(svcPort) && p.name === 'grpc'), `agent --server=${server}: no such grpc port`);
  check(c.image && !c.image.endsWith(':latest') && c.image.includes(':'), `agent image ${c.image} has no pinned tag`);
  const backend = argValue(c, 'backend');
  check(backend === (overlay === 'production' ? 'memlock' : 'sim'), `agent --backend=${backend} in ${overlay}`);
}

// The server StatefulSet and its Services.
const sts = find('StatefulSet', 'dmapin-server');
check(sts, 'no StatefulSet dmapin-server');
if (sts) {
  const pod = sts.spec.template.spec;
  const c = container(sts);
  const podLabels = sts.spec.template.metadata.labels;
  check(sts.spec.replicas === 1, `server replicas ${sts.spec.replicas}`);
  check(matches(sts.spec.selector.matchLabels, podLabels), 'StatefulSet selector does not match its pods');
  const headless = find('Service', sts.spec.serviceName);
  check(headless && headless.spec.clusterIP === 'None', `StatefulSet serviceName ${sts.spec.serviceName} is not a headless Service`);
  const vct = (sts.spec.volumeClaimTemplates || [])[0];
  check(vct && (c.volumeMounts || []).some((m) => m.name === vct.metadata.name && m.mountPath === '/var/lib/dmapin/server'),
    'server state is not a PVC mounted at /var/lib/dmapin/server');
  check(argValue(c, 'state_dir') === '/var/lib/dmapin/server', 'server --state_dir');
  check(pod.securityContext && pod.securityContext.runAsNonRoot === true && pod.securityContext.runAsUser > 0,
    'server does not run as non-root');
  check(pod.automountServiceAccountToken === false, 'server pod mounts a service account token');
  check(find('ServiceAccount', pod.serviceAccountName), `server service account ${pod.serviceAccountName} missing`);
  check((c.securityContext.capabilities.drop || []).includes('ALL') && c.securityContext.allowPrivilegeEscalation === false,
    'server keeps capabilities');
  const tls = checkTls('server', sts, 7480);
  for (const flag of ['tls_cert_file', 'tls_key_file', 'tls_ca_file']) {
    check(tls[flag] && tls[flag].secret, `server --${flag} is not from a Secret`);
  }
  serverTlsSecret = tls.tls_cert_file && tls.tls_cert_file.secret && tls.tls_cert_file.secret.secretName;
  const svc = find('Service', 'dmapin-server');
  check(svc && matches(svc.spec.selector, podLabels), 'Service dmapin-server does not select the server pods');
  const ports = Object.fromEntries(((svc && svc.spec.ports) || []).map((p) => [p.name, p.port]));
  check(ports.grpc === 7480 && ports.metrics === 9480, `Service dmapin-server ports ${JSON.stringify(ports)}`);
  check(c.image && !c.image.endsWith(':latest') && c.image.includes(':'), `server image ${c.image} has no pinned tag`);

  // Monitoring.
  const sm = find('ServiceMonitor', 'dmapin-server');
  check(sm && svc && matches(sm.spec.selector.matchLabels, svc.metadata.labels), 'ServiceMonitor does not select Service dmapin-server');
  check(sm && sm.spec.endpoints.some((e) => e.port === 'metrics'), 'ServiceMonitor does not scrape port metrics');
  check(sm && sm.spec.jobLabel === 'app.kubernetes.io/name' && svc.metadata.labels['app.kubernetes.io/name'] === 'dmapin-server',
    'ServiceMonitor job label would not be dmapin-server');
}
const pm = find('PodMonitor', 'dmapin-agent');
check(pm, 'no PodMonitor dmapin-agent');
if (pm && ds) {
  const podLabels = ds.spec.template.metadata.labels;
  check(matches(pm.spec.selector.matchLabels, podLabels), 'PodMonitor does not select the agent pods');
  const ep = pm.spec.podMetricsEndpoints[0];
  check(ep.port === 'metrics' && container(ds).ports.some((p) => p.name === 'metrics'), 'PodMonitor port is not the agent\'s metrics port');
  check((ep.relabelings || []).some((r) => (r.sourceLabels || []).includes('__meta_kubernetes_pod_node_name') && r.targetLabel === 'node'),
    'PodMonitor does not set the node label from the pod\'s node');
  check(pm.spec.jobLabel === 'app.kubernetes.io/name' && podLabels['app.kubernetes.io/name'] === 'dmapin-agent',
    'PodMonitor job label would not be dmapin-agent');
}
const pr = find('PrometheusRule');
check(pr, 'no PrometheusRule');
if (pr) {
  const rules = YAML.parse(fs.readFileSync(path.join(root, 'deploy/prometheus/dmapin-rules.yaml'), 'utf8'));
  check(canonical(pr.spec) === canonical(rules),
    'PrometheusRule differs from deploy/prometheus/dmapin-rules.yaml: run node tests/deploy/make_prometheusrule.js > deploy/kubernetes/base/prometheusrule.yaml');
}

// NetworkPolicies: each TCP port of each component open only to the peers that need it.
function ingressTo(podLabels, port) {
  const policies = all('NetworkPolicy').filter((np) => matches(np.spec.podSelector.matchLabels || {}, podLabels));
  return policies.flatMap((np) => (np.spec.ingress || [])
    .filter((rule) => (rule.ports || []).some((p) => p.port === port)).flatMap((rule) => rule.from || []));
}
const agentPods = { 'app.kubernetes.io/name': 'dmapin-agent', 'app.kubernetes.io/component': 'node-agent' };
const serverPods = { 'app.kubernetes.io/name': 'dmapin-server', 'app.kubernetes.io/component': 'control-plane' };
const fromPods = (from, labels) => from.some((f) => f.podSelector && matches(f.podSelector.matchLabels || {}, labels) && !f.namespaceSelector);
const fromAnywhere = (from) => from.some((f) => !f.podSelector && !f.namespaceSelector && !f.ipBlock);
for (const [what, pods, port] of [['agent health', agentPods, 7469], ['server health', serverPods, 7481]]) {
  check(ingressTo(pods, port).length === 0, `${what} (${port}, plaintext) is admitted from pods: only the kubelet needs it`);
}
for (const [what, pods, port, peers] of [['agent gRPC', agentPods, 7470, [serverPods]],
  ['server gRPC', serverPods, 7480, [agentPods]]]) {
  const from = ingressTo(pods, port);
  check(from.length > 0, `no NetworkPolicy admits ${what} (${port}) from anyone: it is open to every pod`);
  for (const peer of peers) check(fromPods(from, peer), `${what} (${port}) does not admit ${peer['app.kubernetes.io/name']}`);
  check(!fromAnywhere(from), `${what} (${port}) admits every pod`);
  check(all('NetworkPolicy').some((np) => matches(np.spec.podSelector.matchLabels || {}, pods) &&
    (np.spec.policyTypes || []).includes('Ingress')), `${what}: no Ingress NetworkPolicy selects its pods`);
}

// cert-manager (overlay cert-manager): the certificates the workloads mount come from it.
const certs = all('Certificate');
if (certs.length > 0) {
  for (const cert of certs) {
    const ref = cert.spec.issuerRef || {};
    check((ref.kind || 'Issuer') === 'Issuer' && find('Issuer', ref.name),
      `Certificate/${cert.metadata.name}: issuer ${ref.kind}/${ref.name} is not in the output`);
  }
  const bySecret = (name) => certs.find((c) => c.spec.secretName === name);
  const serverCert = bySecret(serverTlsSecret);
  check(serverCert, `no Certificate issues the server's Secret ${serverTlsSecret}`);
  if (serverCert) {
    check((serverCert.spec.uris || []).includes('spiffe://dmapin/server'), 'the server Certificate does not name spiffe://dmapin/server');
    check((serverCert.spec.dnsNames || []).includes(agentServerHost),
      `the server Certificate does not name ${agentServerHost}, the host the agents dial (--server)`);
  }
  const caCert = bySecret(agentCaSecret);
  check(caCert && caCert.spec.isCA === true, `the agents' CA Secret ${agentCaSecret} is not issued by an isCA Certificate`);
  const caIssuer = all('Issuer').find((i) => i.spec.ca && i.spec.ca.secretName === agentCaSecret);
  check(caIssuer, `no CA Issuer signs with ${agentCaSecret}`);
  if (serverCert && caIssuer) check(serverCert.spec.issuerRef.name === caIssuer.metadata.name, 'the server Certificate is not signed by the agents\' CA');
  const nodes = certs.filter((c) => (c.spec.uris || []).some((u) => u.startsWith('spiffe://dmapin/node/')));
  check(nodes.length > 0, 'no node Certificate (spiffe://dmapin/node/<node>)');
  for (const n of nodes) {
    check(n.spec.uris.length === 1 && /^spiffe:\/\/dmapin\/node\/[^/]+$/.test(n.spec.uris[0]),
      `Certificate/${n.metadata.name}: a node certificate names exactly one node`);
  }
}

// Dashboards.
const dashDir = path.join(root, 'dashboards');
const jsonFiles = fs.readdirSync(dashDir).filter((f) => f.endsWith('.json'));
const dashMaps = all('ConfigMap').filter((cm) => (cm.metadata.labels || {}).grafana_dashboard === '1');
for (const f of jsonFiles) {
  const cm = dashMaps.find((m) => m.data && m.data[f] !== undefined);
  check(cm, `dashboard ${f} is in no ConfigMap labelled grafana_dashboard: "1"`);
  if (cm) check(cm.data[f] === fs.readFileSync(path.join(dashDir, f), 'utf8'), `ConfigMap ${cm.metadata.name} differs from dashboards/${f}`);
}
// Policy.
const policy = find('ConfigMap', 'dmapin-policy');
check(policy, 'no ConfigMap dmapin-policy');
for (const [k, v] of Object.entries((policy && policy.data) || {})) {
  let body;
  try { body = JSON.parse(v); } catch (e) { body = null; }
  check(body && body.policy && body.policy.name, `dmapin-policy ${k} is not a SetPolicyRequest JSON`);
}

process.stdout.write(`[${overlay}] ${docs.length} objects: ${checks - failures} passed, ${failures} failed\n`);
process.exit(failures ? 1 : 0);
