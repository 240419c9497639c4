# Sourced, from the repository root, by the interleaved benchmark scripts bench/results/*/run.sh
# once they have set OUT (the results folder). It creates OUT (made absolute) and sets ROOT (the
# repository), PEER (the peers' folder) and PY (the peers' python). waitidle blocks until the
# machine is idle (under 15 % busy over 3 s, or 300 s have passed) and logs the wait to
# $OUT/runs.txt, so that no run starts while another job still holds the cores.
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
ROOT=$(pwd); PEER=$ROOT/../shared/bench/peers; PY=${PY:-$HOME/.cache/rlhf-jax-peers/bin/python}
cpu() { awk '/^cpu /{print $2+$3+$4+$6+$7+$8, $5}' /proc/stat; }
waitidle() {
  local t0 b1 i1 b2 i2 busy
  t0=$(date +%s)
  while :; do
    read -r b1 i1 <<< "$(cpu)"; sleep 3; read -r b2 i2 <<< "$(cpu)"
    busy=$(( (b2 - b1) * 100 / ((b2 - b1) + (i2 - i1) + 1) ))
    [ "$busy" -lt 15 ] && break
    [ $(( $(date +%s) - t0 )) -gt 300 ] && break
  done
  echo "$(date -u +%H:%M:%SZ) idle after $(( $(date +%s) - t0 )) s (busy $busy %)" >> "$OUT/runs.txt"
}
