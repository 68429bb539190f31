#!/usr/bin/env python3
"""Writes the seed corpora of the gRPC handler fuzzers (tests/fuzz/corpus/{agent,server}_service).

Each seed is a sequence of records [method, caller, len lo, len hi, request bytes], the requests
written in protobuf text format here and encoded with `protoc --encode` (no Python protobuf
needed). Method numbers follow the harnesses' switch statements. Run from anywhere:

    tests/fuzz/make_service_seeds.py
"""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
API = os.path.join(ROOT, "api")

# agent_service_fuzz.cc: method % 18.
AGENT = {
    "CreateContext": (0, "CreateContextRequest"),
    "GetContext": (1, "GetContextRequest"),
    "ListContexts": (2, "ListContextsRequest"),
    "TeardownContext": (3, "TeardownContextRequest"),
    "AttachMemory": (4, "AttachMemoryRequest"),
    "CreateContainer": (5, "CreateContainerRequest"),
    "GetContainer": (6, "GetContainerRequest"),
    "ListContainers": (7, "ListContainersRequest"),
    "ReleaseContainer": (8, "ReleaseContainerRequest"),
    "RegisterRegion": (9, "RegisterRegionRequest"),
    "UnregisterRegion": (10, "UnregisterRegionRequest"),
    "MapDma": (11, "MapDmaRequest"),
    "UnmapDma": (12, "UnmapDmaRequest"),
    "DmaSession": (13, "DmaSessionRequest"),
    "Translate": (14, "TranslateRequest"),
    "Lookup": (15, "LookupRequest"),
    "ListRegions": (16, "ListRegionsRequest"),
    "GetNodeStatus": (17, "GetNodeStatusRequest"),
}

# server_service_fuzz.cc: method % 20 (Admin calls, ReconcileNow, then the Control streams).
SERVER = {
    "SetPolicy": (0, "SetPolicyRequest"),
    "GetPolicy": (1, "GetPolicyRequest"),
    "ListPolicies": (2, "ListPoliciesRequest"),
    "DeletePolicy": (3, "DeletePolicyRequest"),
    "CreateIntent": (4, "CreateIntentRequest"),
    "GetIntent": (5, "GetIntentRequest"),
    "ListIntents": (6, "ListIntentsRequest"),
    "WithdrawIntent": (7, "WithdrawIntentRequest"),
    "ListNodes": (8, "ListNodesRequest"),
    "GetNode": (9, "GetNodeRequest"),
    "CordonNode": (10, "CordonNodeRequest"),
    "UncordonNode": (11, "UncordonNodeRequest"),
    "DrainNode": (12, "DrainNodeRequest"),
    "ListRegions": (13, "ListRegionsFleetRequest"),
    "GetRegion": (14, "GetRegionFleetRequest"),
    "ListDecisions": (15, "ListDecisionsRequest"),
    "Reconcile": (16, "ListNodesRequest"),  # ServerCore::ReconcileNow(); the bytes are ignored
    "AgentMessage": (17, "AgentMessage"),  # on stream arg % 2
    "CloseStream": (18, "ListNodesRequest"),  # stream arg % 2; the bytes are ignored
    "Answer": (19, "DecisionResult"),  # on stream arg % 2, to its last decision
}

PROTO_OF = {
    "agent": "dmapin/v1/agent.proto",
    "admin": "dmapin/v1/admin.proto",
    "control": "dmapin/v1/control.proto",
}


def encode(proto, message, text):
    return subprocess.run(
        ["protoc", "--proto_path=" + API, "--encode=dmapin.v1." + message, PROTO_OF[proto]],
        input=text.encode(), stdout=subprocess.PIPE, check=True).stdout


def record(table, proto, name, text="", caller=0):
    method, message = table[name]
    body = encode(proto, message, text)
    return bytes([method, caller, len(body) & 0xff, len(body) >> 8]) + body


# Caller bytes (agent_service_fuzz.cc ResolveCaller): 0 the agent, 1 TCP, 2 local self uid 0,
# 2 | 1 << 4 local self as the manager, 2 | 2 << 4 local self as an ordinary user,
# 2 | 1 << 2 local parent process.
INTERNAL, REMOTE, SELF, SELF_MANAGER, SELF_USER, PARENT = 0, 1, 2, 2 | 16, 2 | 32, 2 | 4


def agent(name, text="", caller=INTERNAL):
    return record(AGENT, "agent", name, text, caller)


def agent_seeds():
    ctx = 'name: "vm1" memlock_limit_bytes: 1048576'
    ctr = 'name: "c1" iommu_page_size: 4096'
    reg = 'container: "c1" context: "vm1" ua: 268435456 size: 65536'
    seeds = {}
    seeds["01_lifecycle_internal"] = b"".join([
        agent("CreateContext", ctx), agent("CreateContainer", ctr), agent("RegisterRegion", reg),
        agent("MapDma", 'container: "c1" iova: 0 ua: 268435456 size: 16384'),
        agent("Translate", 'context: "vm1" uas: 268435456 uas: 268439552'),
        agent("Lookup", 'context: "vm1" ua: 268435456 size: 4096'),
        agent("ListRegions", 'context: "vm1" with_hpas: true'),
        agent("UnregisterRegion", 'container: "c1" ua: 268435456 size: 65536'),
        agent("UnmapDma", 'container: "c1" iova: 0 size: 16384'),
        agent("ReleaseContainer", 'name: "c1"'), agent("TeardownContext", 'name: "vm1"'),
        agent("GetNodeStatus"),
    ])
    seeds["02_local_owner"] = b"".join([
        agent("CreateContext", ctx, SELF), agent("CreateContainer", ctr, SELF),
        agent("RegisterRegion", reg, SELF),
        agent("MapDma", 'container: "c1" iova: 4096 ua: 268435456 size: 8192', SELF),
        agent("MapDma", 'container: "c1" iova: 65536 ua: 268435456 size: 4096', PARENT),
        agent("MapDma", 'container: "c1" iova: 65536 ua: 268435456 size: 4096', REMOTE),
        agent("Translate", 'context: "vm1" uas: 268435456', SELF_USER),
        agent("ListRegions", 'with_hpas: true', REMOTE),
        agent("TeardownContext", 'name: "vm1"', PARENT),
        agent("TeardownContext", 'name: "vm1"', SELF),
    ])
    seeds["03_manager_for_pid"] = b"".join([
        agent("CreateContext", 'name: "vm2" owner_pid: 1 memlock_unlimited: true', SELF_MANAGER),
        agent("CreateContext", 'name: "vm3" owner_pid: 1', SELF_USER),
        agent("CreateContext", 'name: "vm4" owner_pid: 7', REMOTE),
        agent("CreateContainer", 'name: "c2" window_start: 0 window_size: 1048576', SELF_MANAGER),
        agent("RegisterRegion", 'container: "c2" context: "vm2" ua: 4096 size: 4096',
              SELF_MANAGER),
        agent("AttachMemory", 'context: "vm2" slots { ua: 0 size: 4096 }', SELF_MANAGER),
        agent("ListContexts"), agent("ListContainers"), agent("GetContext", 'name: "vm2"'),
        agent("GetContainer", 'name: "c2"'),
    ])
    seeds["04_dma_session_and_busy"] = b"".join([
        agent("CreateContext", ctx), agent("CreateContainer", ctr), agent("RegisterRegion", reg),
        agent("DmaSession", 'tag: 7 map { container: "c1" iova: 0 ua: 268435456 size: 4096 }'),
        agent("UnregisterRegion", 'container: "c1" ua: 268435456 size: 65536'),
        agent("MapDma", 'container: "c1" iova: 8192 ua: 268435456 size: 4096'),
        agent("DmaSession", 'tag: 8 unmap { container: "c1" iova: 0 size: 4096 }'),
        agent("DmaSession", 'tag: 9'),
        agent("RegisterRegion", 'container: "c1" context: "vm1" ua: 268435456 size: 65536'),
        agent("ReleaseContainer", 'name: "c1"'),
    ])
    seeds["05_limits_and_errors"] = b"".join([
        agent("CreateContext", 'name: "vm1" memlock_limit_bytes: 16384'),
        agent("CreateContext", 'name: "vm1"'), agent("CreateContext", 'name: "bad name!"'),
        agent("CreateContainer", 'name: "c1" iommu_page_size: 12288'),
        agent("CreateContainer", 'name: "c1" iommu_page_size: 65536 window_size: 1048576'),
        agent("RegisterRegion", 'container: "c1" context: "vm1" ua: 65536 size: 65536'),
        agent("RegisterRegion", 'container: "c1" context: "vm1" ua: 4096 size: 0'),
        agent("RegisterRegion", 'container: "c1" context: "vm1" ua: 0 size: 268435456'),
        agent("MapDma", 'container: "c1" iova: 18446744073709547520 ua: 65536 size: 8192'),
        agent("Translate", 'context: "vm1" uas: 1 uas: 2 uas: 3'),
        agent("Lookup", 'context: "nope" ua: 0 size: 4096'),
    ])
    return seeds


def server(name, text="", stream=0):
    proto = "control" if name in ("AgentMessage", "Answer") else "admin"
    return record(SERVER, proto, name, text, stream)


HELLO = ('hello { node_name: "n1" agent_version: "fuzz" incarnation: "i1" page_size: 4096 '
         'max_region_bytes: 1048576 max_pinned_bytes: 4194304 }')


def server_seeds():
    seeds = {}
    intent = ('kind: INTENT_KIND_REGISTER node: "n1" context: "vm1" container: "c1" '
              'ua: 268435456 size: 65536 labels { key: "tier" value: "gold" }')
    policy = ('policy { name: "p1" node_selector { key: "pool" value: "a" } '
              'pinned_bytes_budget: 1048576 max_regions_per_node: 4 context_quota_bytes: 524288 '
              'allow { key: "tier" values: "gold" } ebusy_retry { initial_backoff_ms: 1 } }')
    snapshot = ('snapshot { version: 1 contexts { name: "vm1" memlock_unlimited: true } '
                'containers { name: "c1" iommu_page_size: 4096 context: "vm1" } '
                'regions { context: "vm1" ua: 268435456 size: 65536 entries: 16 used: 1 '
                'page_size: 4096 containers: "c1" } }')
    seeds["01_policy_intent"] = b"".join([
        server("SetPolicy", policy), server("GetPolicy", 'name: "p1"'), server("ListPolicies"),
        server("CreateIntent", intent + " dry_run: true"), server("CreateIntent", intent),
        server("ListIntents", "page_size: 1"), server("ListNodes"), server("GetNode", 'name: "n1"'),
        server("CordonNode", 'name: "n1"'), server("CreateIntent", intent),
        server("UncordonNode", 'name: "n1"'), server("DrainNode", 'name: "n1"'),
        server("GetIntent", 'id: "$"'), server("WithdrawIntent", 'id: "$"'),
        server("DeletePolicy", 'name: "p1"'), server("ListDecisions"), server("ListRegions"),
    ])
    seeds["02_agent_stream"] = b"".join([
        server("AgentMessage", HELLO), server("AgentMessage", snapshot),
        server("CreateIntent", intent.replace("268435456", "268500992")), server("Reconcile"),
        server("Answer", "errno_value: 0"), server("AgentMessage", "heartbeat { sequence: 1 }"),
        server("Reconcile"), server("ListNodes"), server("GetIntent", 'id: "$"'),
        server("GetRegion", 'node: "n1" context: "vm1" ua: 268435456 size: 65536'),
        server("ListRegions", 'node: "n1"'), server("CloseStream"), server("GetNode", 'name: "n1"'),
    ])
    seeds["03_two_streams_one_node"] = b"".join([
        server("AgentMessage", HELLO, 0), server("AgentMessage", HELLO, 1),
        server("CreateIntent", intent), server("Reconcile"),
        server("Answer", 'errno_value: 16 errno_name: "EBUSY" message: "EBUSY: busy"', 1),
        server("AgentMessage", "heartbeat { }", 0), server("AgentMessage", snapshot, 0),
        server("Reconcile"), server("WithdrawIntent", 'id: "$"'), server("CloseStream", "", 1),
        server("Reconcile"), server("ListNodes"),
    ])
    seeds["04_stream_errors"] = b"".join([
        server("AgentMessage", "heartbeat { }", 0), server("AgentMessage", HELLO, 1),
        server("AgentMessage", HELLO, 1), server("AgentMessage", 'hello { }', 0),
        server("GetNode", 'name: "n1"'), server("GetIntent", 'id: "nope"'),
        server("SetPolicy", 'policy { name: "bad name!" }'),
        server("CreateIntent", 'kind: INTENT_KIND_REGISTER node: "n1" ua: 1 size: 0'),
        server("ListIntents", 'page_token: "garbage"'),
    ])
    seeds["05_delta_and_teardown"] = b"".join([
        server("AgentMessage", HELLO), server("AgentMessage", snapshot),
        server("AgentMessage", 'delta { version: 2 removed_regions { context: "vm1" '
               'ua: 268435456 size: 65536 } ended_contexts { context: "vm1" owner_pid: 7 } }'),
        server("CreateIntent", 'kind: INTENT_KIND_TEARDOWN_CONTEXT node: "n1" context: "vm1"'),
        server("CreateIntent", 'kind: INTENT_KIND_RELEASE_CONTAINER node: "n1" container: "c1"'),
        server("Reconcile"), server("Answer", 'errno_value: 2 errno_name: "ENOENT" '
                                   'message: "ENOENT: no context"'),
        server("Reconcile"), server("ListDecisions", 'node: "n1" page_size: 2'),
    ])
    return seeds


def write(dirname, seeds):
    out = os.path.join(ROOT, "tests", "fuzz", "corpus", dirname)
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds)} seeds to {out}")


def main():
    which = sys.argv[1:] or ["agent", "server"]
    if "agent" in which:
        write("agent_service", agent_seeds())
    if "server" in which:
        write("server_service", server_seeds())


if __name__ == "__main__":
    main()
