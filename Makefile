# make demo / make test work on a fresh clone: every target depends on `setup`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY := .venv/bin/python
STAMP := .venv/.setup-done
DEV_STAMP := .venv/.setup-dev-done
INSTALL := python3 tools/install.py .venv

# Encode / train variables (override on the command line: make encode SRC=... OUT=...)
SRC ?= data/synthetic/train
OUT ?= data/encoded/tiny-sd15/train
MODEL ?= models/tiny-sd15
RES ?= 64
ENCODE_ARGS ?=
DATA ?= $(OUT)
VAL_DATA ?=
CONFIG ?= configs/demo.toml
OUTPUT_DIR ?= runs/train
TRAIN_ARGS ?=
NPROC ?= 1

# make demo FAMILY=flux (or sd3): the demo on a flow-matching family's tiny model; make models MODEL_FAMILIES=...
FAMILY ?= sd15
MODEL_FAMILIES ?= sd15 sdxl
DEMO_ROWS ?= 3000
DEMO_VAL_ROWS ?= 400
PRETRAIN_ROWS ?= 3000
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-dev models data encode train demo robustness test lint bench bench-losses bench-gpu clean
# The stamps and manifests of the chained rules below are real outputs, not intermediates make may delete.
.SECONDARY:

# Two stamps: what the project runs on (every target), and the test tools and oracle on top (test, lint), so that
# `make demo` on a fresh clone does not wait for them.
setup: $(STAMP)
# tools/install.py: uv (parallel download, unpack and bytecode compile) with pip's package sources; pip where uv fails.
$(STAMP): pyproject.toml tools/install.py
	$(INSTALL) "torch==2.13.0" -e .
	touch $@
setup-dev: $(DEV_STAMP)
$(DEV_STAMP): $(STAMP)
	$(INSTALL) "torch==2.13.0" -e ".[dev]"
	rm -rf .venv/oracle && $(INSTALL) --no-deps --target .venv/oracle \
	  $$($(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["dpo-latents"]["test-oracle"])')
	touch $@

# Synthetic Pick-a-Pic-shaped parquet (train + validation), see embedded/synthetic.py for the preference rule.
data: data/synthetic/.done
data/synthetic/.done: $(STAMP) embedded/synthetic.py
	$(PY) -m embedded.synthetic --out data/synthetic --seed 0 --rows $(DEMO_ROWS) --val-rows $(DEMO_VAL_ROWS) \
	  --rows-per-file 500
	touch $@
# The base models' own pretraining data: another synthetic set (seed 1000, never a preference set of the demo or of
# the README's robustness table), of which pretraining uses the preferred images with their captions.
data/pretrain/.done: $(STAMP) embedded/synthetic.py
	$(PY) -m embedded.synthetic --out data/pretrain --seed 1000 --rows $(PRETRAIN_ROWS) --val-rows 0 --rows-per-file 500
	touch $@

# Tiny random-init SD1.5/SDXL (embedded/tiny_models.py) and SD3/FLUX (embedded/tiny_flow.py) folders in diffusers
# layout (models/.random/). Their VAEs are trained on the pretraining set's images (embedded/train_vae.py), so that
# latents decode to images: models/.init/tiny-X = the random folder with the trained VAE, published by rename; every
# set is encoded with it. Its denoiser is then pretrained on captioned images (configs/pretrain.toml) so that the
# DPO reference already denoises the data and reads its caption, as a real base model does. models/tiny-X = the
# init folder with the pretrained denoiser, published by rename; reruns start again from the same random init, so
# the result depends only on the seeds and configs. The flow families' captions get 32 T5 tokens (they are short).
FLOW_MODELS := tiny-sd3 tiny-flux
is_flow = $(filter $(FLOW_MODELS),$(1))
denoiser = $(if $(call is_flow,$(1)),transformer,unet)
encode_extra = --resolution 64 $(if $(call is_flow,$(1)),--max-sequence-length 32)
models: $(foreach f,$(MODEL_FAMILIES),models/tiny-$(f)/.pretrained)
models/.random/%/.built: $(STAMP) embedded/tiny_models.py embedded/tiny_flow.py
	$(PY) -m embedded.$(if $(call is_flow,$*),tiny_flow,tiny_models) --out models/.random --family $(subst tiny-,,$*)
	touch $@
models/.init/%/.built: models/.random/%/.built data/pretrain/.done embedded/train_vae.py
	rm -rf models/.init/$*.tmp && mkdir -p models/.init && cp -r models/.random/$* models/.init/$*.tmp
	$(PY) -m embedded.train_vae --model models/.init/$*.tmp --images data/pretrain/train
	touch models/.init/$*.tmp/.built && rm -rf models/.init/$* && mv models/.init/$*.tmp models/.init/$*
data/encoded/%/train/manifest.json: models/.init/%/.built data/synthetic/.done
	$(PY) -m stages.encode --src data/synthetic/train --out data/encoded/$*/train --model models/.init/$* \
	  $(call encode_extra,$*)
data/encoded/%/pretrain/manifest.json: models/.init/%/.built data/pretrain/.done
	$(PY) -m stages.encode --src data/pretrain/train --out data/encoded/$*/pretrain --model models/.init/$* \
	  $(call encode_extra,$*)
data/encoded/%/validation/manifest.json: models/.init/%/.built data/synthetic/.done
	$(PY) -m stages.encode --src data/synthetic/validation --out data/encoded/$*/validation --model models/.init/$* \
	  $(call encode_extra,$*)
models/%/.pretrained: data/encoded/%/pretrain/manifest.json configs/pretrain.toml
	rm -rf runs/pretrain-$*
	$(PY) -m trainer.train --config configs/pretrain.toml --data data/encoded/$*/pretrain --model models/.init/$* \
	  --output-dir runs/pretrain-$*
	rm -rf models/$*.tmp && cp -r models/.init/$* models/$*.tmp && rm -rf models/$*.tmp/$(call denoiser,$*)
	cp -r runs/pretrain-$*/final/$(call denoiser,$*) models/$*.tmp/ && touch models/$*.tmp/.pretrained
	rm -rf models/$* && mv models/$*.tmp models/$*

encode: $(STAMP)
	$(PY) -m stages.encode --src $(SRC) --out $(OUT) --model $(MODEL) --resolution $(RES) $(ENCODE_ARGS)

train: $(STAMP)
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m trainer.train --config $(CONFIG) \
	  --data $(DATA) --model $(MODEL) --output-dir $(OUTPUT_DIR) $(if $(VAL_DATA),--val-data $(VAL_DATA)) $(TRAIN_ARGS)

# Synthetic data → encode (train + validation) → DPO with configs/demo.toml → held-out accuracy, before and after;
# then (SD1.5/SDXL) the held-out captions x DEMO_SEEDS images from the reference and from the DPO policy, scored by
# the synthetic rule, the policy's win rate over the reference and RUN/report.html. The run's earlier images go first:
# they were sampled from an earlier policy. (The validation split is one parquet file while DEMO_VAL_ROWS <= 500.)
DEMO_RUN = runs/demo$(if $(filter-out sd15,$(FAMILY)),-$(FAMILY))
DEMO_SEEDS ?= 4
DEMO_SAMPLE = --model models/tiny-$(FAMILY) --out $(DEMO_RUN) --images-per-prompt $(DEMO_SEEDS) --dedup \
  --prompts data/synthetic/validation/validation-00000-of-00001.parquet:caption
demo: models/tiny-$(FAMILY)/.pretrained data/encoded/tiny-$(FAMILY)/train/manifest.json \
  data/encoded/tiny-$(FAMILY)/validation/manifest.json
	$(PY) -m trainer.demo --config configs/demo.toml --data data/encoded/tiny-$(FAMILY)/train \
	  --val-data data/encoded/tiny-$(FAMILY)/validation --defects data/synthetic/validation/loser_defects.json \
	  --model models/tiny-$(FAMILY) --output-dir $(DEMO_RUN) --overwrite-output-dir
ifeq ($(call is_flow,tiny-$(FAMILY)),)
	rm -rf $(DEMO_RUN)/{images.jsonl,scores.jsonl,report.html,reference,dpo}
	$(PY) -m evaluation.sample $(DEMO_SAMPLE) --name reference
	$(PY) -m evaluation.sample $(DEMO_SAMPLE) --name dpo --unet $(DEMO_RUN)/final/unet
	$(PY) -m evaluation.score --images $(DEMO_RUN) --scorer rule
	$(PY) -m evaluation.compare --images $(DEMO_RUN) --a reference --b dpo
endif

# The README's robustness table: the demo config on 5 preference-set seeds that did not tune its learning rate x 2
# training-set sizes, against the one pretrained reference (resumable: finished runs are kept in
# build/robustness/results.jsonl).
robustness: models/tiny-sd15/.pretrained
	$(PY) -m bench.robustness --work build/robustness --out build/robustness/table.md

test: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests

lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(DEV_STAMP)
	$(PY) -m bench.run --out BENCHMARKS.md

# Every --loss with the demo's config and step budget, scored on the held-out pairs against the base model.
bench-losses: models/tiny-sd15/.pretrained data/encoded/tiny-sd15/train/manifest.json \
  data/encoded/tiny-sd15/validation/manifest.json
	$(PY) -m bench.losses --data data/encoded/tiny-sd15/train --val-data data/encoded/tiny-sd15/validation \
	  --model models/tiny-sd15 --out BENCHMARKS_LOSSES.md

# On a GPU machine: real SD1.5/SDXL architectures (random init), bf16. Writes BENCHMARKS_GPU.md.
bench-gpu: $(STAMP)
	$(PY) -m bench.gpu --out BENCHMARKS_GPU.md --work build/bench-gpu

clean:
	rm -rf data runs models
