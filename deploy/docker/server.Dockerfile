# syntax=docker/dockerfile:1
# dmapin-server, the central service (a one-replica StatefulSet on Kubernetes).
# Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t dmapin-server:dev .
# Not built in CI (no registry here); the Debian packages are the ones of ./run.

# --- build: the same Debian packages and the same bazel command as ./run -----------------------
FROM debian:bookworm-slim AS build
# DMAPIN_SKIP_NPM: the image needs none of the test tooling (npm packages of tests/deploy).
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 DMAPIN_SKIP_NPM=1
WORKDIR /src
# ./run setup installs DMAPIN_APT_PACKAGES (the list at the top of ./run).
COPY run ./run
RUN ./run setup && rm -rf /var/lib/apt/lists/*
COPY . .
# The offline build of ./run build (.bazelrc: --spawn_strategy=local, -O2, -g1).
RUN bazel build --curses=no --color=no //server:dmapin-server \
 && install -D -m 0755 bazel-bin/server/dmapin-server /out/dmapin-server \
 && strip --strip-debug /out/dmapin-server

# --- runtime: the binary, its Debian runtime libraries, a non-root user -------------------------
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libsqlite3-0 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libcivetweb1 \
      libre2-9 libc-ares2 libssl3 libatomic1 zlib1g libgoogle-glog0v6 libgflags2.2 libunwind8 liblzma5 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/dmapin-server /usr/local/bin/dmapin-server
RUN ! ldd /usr/local/bin/dmapin-server | grep 'not found' && /usr/local/bin/dmapin-server --help >/dev/null
# The server needs no privilege: it runs as dmapin (65532) and owns only its state directory.
RUN groupadd --system --gid 65532 dmapin \
 && useradd --system --uid 65532 --gid dmapin --home-dir /var/lib/dmapin/server --no-create-home \
      --shell /usr/sbin/nologin dmapin \
 && install -d -o dmapin -g dmapin -m 0750 /var/lib/dmapin/server
USER 65532:65532
# 7480 gRPC (dmapin.v1.Admin, dmapin.v1.Control, grpc.health.v1, reflection), 9480 /metrics.
EXPOSE 7480 9480
VOLUME ["/var/lib/dmapin/server"]
ENTRYPOINT ["/usr/local/bin/dmapin-server"]
CMD ["--state_dir=/var/lib/dmapin/server", "--grpc_address=0.0.0.0:7480", \
     "--metrics_address=0.0.0.0:9480"]
