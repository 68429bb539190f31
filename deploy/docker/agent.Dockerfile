# syntax=docker/dockerfile:1
# dmapin-agent, the node agent (one per virtualization host, a DaemonSet on Kubernetes).
# Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t dmapin-agent:dev .
# Not built in CI (no registry here); the Debian packages are the ones of ./run.

# --- build: the same Debian packages and the same bazel command as ./run -----------------------
FROM debian:bookworm-slim AS build
# DMAPIN_SKIP_NPM: the image needs none of the test tooling (npm packages of tests/deploy).
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 DMAPIN_SKIP_NPM=1
WORKDIR /src
# ./run setup installs DMAPIN_APT_PACKAGES (the list at the top of ./run): Bazel 4.2 from
# bazel-bootstrap, Debian's gRPC, protobuf, Abseil, prometheus-cpp, SQLite, clang/g++ ...
COPY run ./run
RUN ./run setup && rm -rf /var/lib/apt/lists/*
COPY . .
# The offline build of ./run build (.bazelrc: --spawn_strategy=local, -O2, -g1).
RUN bazel build --curses=no --color=no //agent:dmapin-agent \
 && install -D -m 0755 bazel-bin/agent/dmapin-agent /out/dmapin-agent \
 && strip --strip-debug /out/dmapin-agent

# --- runtime: the binary and the Debian runtime libraries it links against ---------------------
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
# Runtime packages of the shared libraries (ldd of the binary, mapped with dpkg -S).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libsqlite3-0 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libcivetweb1 \
      libre2-9 libc-ares2 libssl3 libatomic1 zlib1g libgoogle-glog0v6 libgflags2.2 libunwind8 liblzma5 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/dmapin-agent /usr/local/bin/dmapin-agent
# Fail the build if a library is missing.
RUN ! ldd /usr/local/bin/dmapin-agent | grep 'not found' && /usr/local/bin/dmapin-agent --help >/dev/null
RUN mkdir -p /var/lib/dmapin/agent /run/dmapin
# The agent stays root: it pins memory (IPC_LOCK, raising RLIMIT_MEMLOCK needs SYS_RESOURCE),
# opens /dev/vfio and /dev/hugepages and creates the VMMs' Unix socket in /run/dmapin. The
# DaemonSet drops every other capability (deploy/kubernetes/base/agent-daemonset.yaml).
USER 0:0
# 7470 gRPC (dmapin.v1.NodeAgent, grpc.health.v1, reflection), 9470 Prometheus /metrics.
EXPOSE 7470 9470
VOLUME ["/var/lib/dmapin/agent"]
ENTRYPOINT ["/usr/local/bin/dmapin-agent"]
CMD ["--state_dir=/var/lib/dmapin/agent", "--uds_path=/run/dmapin/agent.sock", \
     "--tcp_address=0.0.0.0:7470", "--metrics_address=0.0.0.0:9470"]
