# runledger: the CLI and demo worker in a small image.
#   docker build -t runledger .
#   docker run --rm -e REDIS_URL=redis://host.docker.internal:6379/ runledger queues

# Build stage: the same command the README gives for a local build.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY lua ./lua
RUN cargo build --release

# Runtime stage: just the binary.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /src/target/release/runledger /usr/local/bin/runledger
USER nobody
ENTRYPOINT ["runledger"]
CMD ["--help"]
