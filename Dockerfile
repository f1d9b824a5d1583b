# dualwrite: one binary, every service by subcommand.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin dualwrite

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 zlib1g ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home dualwrite
COPY --from=build /src/target/release/dualwrite /usr/local/bin/dualwrite
USER 10001
ENTRYPOINT ["/usr/local/bin/dualwrite"]
CMD ["--help"]
