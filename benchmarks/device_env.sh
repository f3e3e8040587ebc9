# Source on the lent GPU machine, from the repository root:  source benchmarks/device_env.sh
# Makes `import keras_hps` (with its mapped subpackages) work without pip, and installs
# carried wheels (.whl/, e.g. keras) when the call carried them.
set -e
_KH_SITE=/tmp/keras_hps_site
rm -rf "$_KH_SITE" && mkdir -p "$_KH_SITE/keras_hps"
cp -r keras_hps/. "$_KH_SITE/keras_hps/"
ln -s "$PWD/triton_kernels" "$_KH_SITE/keras_hps/triton_kernels"
ln -s "$PWD/export" "$_KH_SITE/keras_hps/export"
ln -s "$PWD/serving" "$_KH_SITE/keras_hps/serving"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/whl_site .whl/*.whl
  export PYTHONPATH="/tmp/whl_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$_KH_SITE:$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
set +e
