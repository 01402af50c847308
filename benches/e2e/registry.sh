# Shared by the e2e benchmarks (sourced): a docker-registry config and a free loopback port.

# registry_config FILE DATA ADDR: a docker-registry config at FILE serving the storage under DATA
# at ADDR, with its access log on (the benchmarks count the bytes each GET sent).
registry_config() {
  cat > "$1" <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $2
http:
  addr: $3
YML
}

# free_port: a loopback TCP port nothing listens on now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
