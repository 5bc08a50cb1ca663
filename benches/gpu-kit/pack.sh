#!/usr/bin/env bash
# Packs what the device checks of issue 8 need into .gpu-kit/ (git-ignored), for a machine with a GPU but no
# Rust toolchain: the release binary and every test binary (stripped, xz-compressed), and the Vulkan loader
# (Debian's libvulkan1, unpacked there by run.sh). Then, with the device tool:
#
#   run(command="bash benches/gpu-kit/run.sh", carry=[".gpu-kit"], timeout_s=570)
#
# and read $OUT/summary.txt (run.sh writes every log beside it). Keep the kit under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=.gpu-kit
rm -rf "$kit"
mkdir -p "$kit/bin" "$kit/debs"

cargo build --release --bin wgpu-mlkd
strip -o "$kit/bin/wgpu-mlkd" target/release/wgpu-mlkd
# Every test binary, named by its test target ("lib" for the library's unit tests, "main" for the binary's).
cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = {"lib": "lib", "bin": "main"}.get(kind, m["target"]["name"])
        print(name, m["executable"])
' | while read -r name exe; do
    strip -o "$kit/bin/test-$name" "$exe"
done
tar -C "$kit" -cf - bin | xz -T0 -6 > "$kit/bin.tar.xz"
rm -rf "$kit/bin"

# The Vulkan loader, for an image that has the NVIDIA driver but no libvulkan, and the glvnd GL/EGL libraries
# NVIDIA's Vulkan driver loads (device README's recipe; without them the H100 image found no adapter).
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gpu-kit-apt'
mkdir -p /tmp/gpu-kit-apt/partial
apt-get $o update >/dev/null
(cd "$kit/debs" && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
git rev-parse HEAD > "$kit/commit"
git diff --quiet HEAD || echo "(with uncommitted changes)" >> "$kit/commit"
du -sh "$kit"
