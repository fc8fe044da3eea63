# Sourced by the device scripts: make OUT_DIR ($out) absolute, go to the repo root and, in a bare checkout (no
# installed package, as on a lent GPU), link in the packages pyproject maps under pdllm/.
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
python3 -c "import pdllm.kernels" 2>/dev/null || for d in cluster prefill_node decode_node kernels proto; do
    [ -e "pdllm/$d" ] || ln -s "../$d" "pdllm/$d"
done
