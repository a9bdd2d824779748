#!/usr/bin/env bash
# Build the kit that scripts/device/relay_scaling.sh needs on a many-core benchmark machine without internet
# (x86-64, Python 3.12), in the folder .devkit of the repository root. .devkit is ignored through
# .git/info/exclude (not .gitignore) and never committed; copy it to that machine with the tree (about 35 MB).
#
#   .devkit/whl/    cp312 manylinux wheels of the project's pinned dependencies (pyproject.toml) and theirs
#   .devkit/redis/  Debian 12's redis-server 7.0 unpacked with `dpkg -x` together with every library it loads,
#                   glibc's loader included: it runs as
#                   .devkit/redis/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path <its libs> .../redis-server
#                   so it needs nothing from that machine's own libraries (whatever their versions)
#
# Run here (Debian 12 with apt and pip that reach their registries):  bash scripts/device/build_kit.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.devkit/' .git/info/exclude 2>/dev/null || echo '/.devkit/' >> .git/info/exclude
PIP=${PIP:-.venv/bin/python -m pip}
mkdir -p .devkit/whl .devkit/deb
# The pins of pyproject.toml and the versions their own dependencies have in .venv (pip freeze).
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .devkit/whl \
  aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 \
  propcache==0.5.4 yarl==1.25.1 idna==3.20 uvloop==0.23.0 orjson==3.13.0 redis==8.1.0 hiredis==3.5.0 \
  prometheus_client==0.26.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 PyYAML==6.0.4
# redis-server (a link to redis-check-rdb, in redis-tools) and what `ldd` lists for it, glibc included.
(cd .devkit/deb && apt-get download redis-server redis-tools libjemalloc2 liblzf1 libatomic1 libsystemd0 libssl3 \
  libcap2 libgcrypt20 liblz4-1 libzstd1 liblzma5 libgpg-error0 libc6 libstdc++6 libgcc-s1)
rm -rf .devkit/redis && mkdir -p .devkit/redis
for f in .devkit/deb/*.deb; do dpkg -x "$f" .devkit/redis/; done
# Only the binaries and libraries travel (the debs stay here, outside the carried folders).
rm -rf .devkit/redis/usr/share .devkit/redis/etc .devkit/redis/usr/lib/x86_64-linux-gnu/gconv .devkit/redis/usr/libexec \
  .devkit/redis/usr/sbin .devkit/redis/sbin .devkit/redis/usr/lib/systemd .devkit/redis/lib/systemd .devkit/redis/lib64
K=.devkit/redis
"$K/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$K/lib/x86_64-linux-gnu:$K/usr/lib/x86_64-linux-gnu" \
  "$K/usr/bin/redis-server" --version
du -sh .devkit/whl .devkit/redis
