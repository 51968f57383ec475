# The two commands a newcomer needs: `make demo` and `make test`.
# Both install libtorch (PyPI torch wheel in .venv) on first use.

# One build folder per machine, shared by every clone.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/genecis-rs/target

.PHONY: setup demo test build
setup:
	@bash scripts/setup.sh

build: setup
	cargo build

demo: setup
	cargo run --quiet -- run pipelines/demo.toml
	cargo run --quiet -- status pipelines/demo.toml
	cargo run --quiet -- sql pipelines/demo.toml "SELECT c.caption, r.subject, r.relation, r.object FROM captions c JOIN relations r USING (image_id) ORDER BY image_id, relation_idx LIMIT 12"

test: setup
	cargo test
