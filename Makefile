# The two commands a newcomer needs: `make demo` and `make test`.
# Both install libtorch (PyPI torch wheel in .venv) on first use.

# One build folder per machine, shared by every clone.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/genecis-rs/target

.PHONY: setup demo test build
setup:
	@bash scripts/setup.sh

build: setup
	cargo build

# Release: the world's rendering and the pretraining are several times
# slower in a debug build.
demo: setup
	@echo "demo: building genecis (release). The first build takes about 30 minutes on 2 cores (measured on a fresh 2-core machine); cargo shows its progress."
	cargo build --release
	cargo run --release --quiet -- run pipelines/demo.toml
	@echo "Recall (%) by task and method; chance at R@1 is 1/15 = 6.7%:"
	cargo run --release --quiet -- sql pipelines/demo.toml --file sql/examples/demo_results.sql
	@echo "Report: pipelines/runs/demo/score/report.html (and report.md)"

# With Ballista (`genecis sql --cluster`): every example query also runs on
# its in-process standalone cluster; with s3, workdirs on an S3 server
# (moto, installed by setup.sh) are tested too.
test: setup
	cargo test --features ballista,s3
