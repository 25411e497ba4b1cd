# CosyVoice2 serving stack. `make up` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
# Package roots: each stage's importable package lives in its own service folder; the launcher (`make up`) and the
# developer tools each have their own.
PKG_DIRS := common services/tokenizer services/speaker services/llm services/token2wav services/gateway launcher tools protos/gen
MODEL_SIZE ?= tiny
MODEL_DIR  ?= models/cosyvoice2-$(MODEL_SIZE)
GOLDEN     ?= data/golden/tiny-seed1
# Where `make golden` takes the golden set from: a directory (the one in this repository by default) or an
# http(s) URL of a .tar.gz of one.
GOLDEN_SOURCE ?= golden/tiny-seed1
export MODEL_DIR

.PHONY: venv proto model download golden parity test up down logs ps plan bench profile clean help config-docs screenshot

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(STAMP) ## create .venv with every dependency (CPU torch)

$(STAMP): requirements.txt requirements-nodeps.txt protos/cosyvoice/v1/tts.proto pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) tools/cosyvoice_tools/fix_torchaudio.py
	printf '%s\n' $(addprefix $(CURDIR)/,$(PKG_DIRS)) > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cosyvoice-stack.pth
	$(MAKE) proto
	$(PY) -m pip install -q --no-deps .     # the `cosyvoice` console command (pyproject.toml)
	touch $@

proto: ## generate gRPC code from protos/ into protos/gen (ignored)
	mkdir -p protos/gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos/gen --grpc_python_out=protos/gen protos/cosyvoice/v1/tts.proto
	touch protos/gen/cosyvoice/__init__.py protos/gen/cosyvoice/v1/__init__.py

# --- model + parity ---
MODEL_SEED ?= 1

model: $(STAMP) ## random-weight model dir: MODEL_SIZE=tiny|full, MODEL_DIR (default models/cosyvoice2-$(MODEL_SIZE))
	$(PY) -m cosyvoice_tools.modelgen --size $(MODEL_SIZE) --out $(MODEL_DIR) --seed $(MODEL_SEED)

golden: $(STAMP) ## the golden set (reference outputs on a tiny checkpoint) from GOLDEN_SOURCE into GOLDEN: rand_noise.npy regenerated, every file checked against its SHA256SUMS
	@PYTHON=$(PY) bash tools/fetch_golden.sh "$(GOLDEN_SOURCE)" "$(GOLDEN)"

parity: $(STAMP) golden ## every golden-parity case against GOLDEN (default data/golden/tiny-seed1)
	$(PY) -m cosyvoice_tools.parity --golden $(GOLDEN)

# --- download ---
# The released CosyVoice2-0.5B (Hugging Face, or ModelScope when installed) into DOWNLOAD_DIR, then verified
# against our loaders (files, sizes, state-dict keys/shapes, ONNX I/O). `make download VERIFY_ONLY=1` only checks.
# MODEL_DIR given on the command line or in the environment is the target; its default (the generated tiny
# model's dir) is not, so a download never lands on top of a random-weight model.
DOWNLOAD_DIR    ?= $(if $(filter command line environment,$(origin MODEL_DIR)),$(MODEL_DIR),models/cosyvoice2-0.5b)
DOWNLOAD_SOURCE ?= auto

download: $(STAMP) ## fetch + verify the released model into MODEL_DIR (default models/cosyvoice2-0.5b), DOWNLOAD_SOURCE=auto|hf|modelscope, VERIFY_ONLY=1
	$(PY) -m cosyvoice_tools.download --model-dir $(DOWNLOAD_DIR) --source $(DOWNLOAD_SOURCE) $(if $(VERIFY_ONLY),--verify-only,)

# --- stack ---
# Where stages run: cosyvoice_launcher.placement (deploy/README.md), read by the launcher from the environment.
# Empty = unset: PLACEMENT_FILE (e.g. deploy/placement.example.yaml), then these override it; devices default
# to PLACEMENT_DEFAULT_DEVICE, else cuda:0 when torch sees a GPU, else cpu.
PLACEMENT_VARS = PLACEMENT_FILE PLACEMENT_DEFAULT_DEVICE \
	$(foreach s,TOKENIZER SPEAKER LLM TOKEN2WAV,$(s)_REPLICAS $(s)_DEVICES $(s)_INSTANCES $(s)_BASE_PORT)
# The launcher generates random weights only into the default MODEL_DIR (or with MODEL_GENERATE=1): a MODEL_DIR
# given on the command line or in the environment that does not exist is an error, not a silent random model.
USER_MODEL_DIR = $(if $(filter command line environment,$(origin MODEL_DIR)),$(MODEL_DIR),)
STACK_ENV = MODEL_SIZE=$(MODEL_SIZE) MODEL_DIR="$(USER_MODEL_DIR)" $(foreach v,$(PLACEMENT_VARS),$(v)="$($(v))")

up: $(STAMP) ## start redis + stage servers + gateway (generates the default tiny model if missing; MODEL_DIR=... must exist unless MODEL_GENERATE=1)
	$(STACK_ENV) $(PY) -m cosyvoice_launcher.stack up

down: ## stop everything `make up` started
	$(PY) -m cosyvoice_launcher.stack down

ps: ## each stack process: pid, ports, alive, ready, device
	$(PY) -m cosyvoice_launcher.stack ps

plan: $(STAMP) ## the stage processes `make up` would start (devices, CUDA_VISIBLE_DEVICES, instances, ports)
	$(STACK_ENV) $(PY) -m cosyvoice_launcher.stack plan

logs: ## tail the stack's logs (make logs FOLLOW=1 to follow)
	$(PY) -m cosyvoice_launcher.stack logs $(if $(FOLLOW),--follow,)

config-docs: $(STAMP) ## regenerate docs/CONFIGURATION.md from the configuration classes (a test checks it)
	$(PY) -m cosyvoice_tools.config_docs

screenshot: $(STAMP) ## docs/images/playground.png: the playground after a synthesis, from its headless-Chromium test
	PLAYGROUND_SCREENSHOT=docs/images/playground.png $(PY) -m pytest -q -p no:cacheprovider \
		services/gateway/tests/test_playground_browser.py -k streams_and_plays

PYTEST_ARGS ?=
test: $(STAMP) golden ## the whole test suite (real tritonserver / redis / gateway processes); PYTEST_ARGS adds options
	$(PY) -m pytest -q $(PYTEST_ARGS)

# --- tensorrt-llm ---
# The TensorRT-LLM path of the llm stage (services/llm/trtllm/README.md). trtllm-build needs a TensorRT-LLM machine
# (PYTHON = its interpreter); trtllm-convert and trtllm-repo run anywhere.
TRTLLM_DIR        ?= build/trtllm
TRTLLM_DTYPE      ?= bfloat16
TRTLLM_HF_DIR     ?= $(TRTLLM_DIR)/hf
TRTLLM_ENGINE_DIR ?= $(TRTLLM_DIR)/engine-$(TRTLLM_DTYPE)
TRTLLM_REPO       ?= $(TRTLLM_DIR)/model_repository
TRTLLM_PYTHON     ?= python3

.PHONY: trtllm-convert trtllm-build trtllm-repo

trtllm-convert: $(STAMP) ## llm.pt -> HF Qwen2 checkpoint with the flat speech vocabulary (MODEL_DIR -> TRTLLM_HF_DIR)
	$(PY) -m cosyvoice_llm.trtllm.convert --model-dir $(MODEL_DIR) --out $(TRTLLM_HF_DIR) --dtype $(TRTLLM_DTYPE)

trtllm-build: ## TRTLLM_HF_DIR -> TensorRT-LLM engine TRTLLM_ENGINE_DIR (needs tensorrt_llm: TRTLLM_PYTHON)
	PYTHON=$(TRTLLM_PYTHON) bash services/llm/trtllm/build_engine.sh --hf-dir $(TRTLLM_HF_DIR) \
	  --engine-dir $(TRTLLM_ENGINE_DIR) --work-dir $(TRTLLM_DIR)/work --dtype $(TRTLLM_DTYPE)

trtllm-repo: $(STAMP) ## Triton repository serving TRTLLM_ENGINE_DIR as model `llm` (tensorrtllm backend) in TRTLLM_REPO
	$(PY) -m cosyvoice_llm.trtllm.repo --engine-dir $(abspath $(TRTLLM_ENGINE_DIR)) --out $(TRTLLM_REPO)

# --- bench + profile ---
# make bench: the whole stack (`make up` first); make bench ENGINE_ONLY=1: the in-process pipeline (no servers).
BENCH_MANIFEST    ?= bench/seedtts-like/manifest.jsonl
BENCH_CONCURRENCY ?= 1,2,4,8,16,32
BENCH_MODES       ?= stream,stream-cached,offline
BENCH_DEVICE      ?= cuda
BENCH_LABEL       ?= $(MODEL_SIZE)
BENCH_ARGS        ?=
BENCH_OUT         ?= bench_results/$(if $(ENGINE_ONLY),engine,stack)-$(BENCH_LABEL)-$(shell date +%Y%m%d-%H%M%S).json
STACK_RUN_DIR     ?= run
STAGE             ?= token2wav
STAGE_INPUTS      ?= bench_results/stage_inputs/$(MODEL_SIZE)
STAGE_CONCURRENCY ?= 4
STAGE_DURATION_S  ?= 20
STAGE_DEVICE      ?= cpu
WATCH             ?=

.PHONY: stage-load hostile

bench: $(STAMP) ## benchmark (BRIEF section 4) -> bench_results/*.json; ENGINE_ONLY=1 for the in-process line; CLIENT=seed: the seed's contract on the cosyvoice2 fronts
ifdef ENGINE_ONLY
	$(PY) -m cosyvoice_tools.bench --engine-only --model-dir $(MODEL_DIR) --device $(BENCH_DEVICE) \
		--manifest $(BENCH_MANIFEST) --concurrency $(BENCH_CONCURRENCY) --modes $(BENCH_MODES) \
		--label "$(BENCH_LABEL)" --out $(BENCH_OUT) $(BENCH_ARGS)
else
	$(PY) -m cosyvoice_tools.bench \
		--addr $$($(PY) -m cosyvoice_tools.profile --run-dir $(STACK_RUN_DIR) --print-addresses gateway-grpc) \
		--triton-stats $$($(PY) -m cosyvoice_tools.profile --run-dir $(STACK_RUN_DIR) --print-addresses stage-http) \
		--stage-metrics $$($(PY) -m cosyvoice_tools.profile --run-dir $(STACK_RUN_DIR) --print-addresses stage-metrics) \
		--manifest $(BENCH_MANIFEST) --concurrency $(BENCH_CONCURRENCY) --modes $(BENCH_MODES) \
		--label "$(BENCH_LABEL)" --out $(BENCH_OUT) $(if $(CLIENT),--client $(CLIENT),) $(BENCH_ARGS)
endif

# make hostile: bombs, then overload at HOSTILE_CONCURRENCY (the sustainable load) and 10x it, against the running
# stack (`make up` first); every process of STACK_RUN_DIR must survive. COSYVOICE_API_KEY set = auth on.
HOSTILE_CONCURRENCY ?= 2
HOSTILE_ARGS        ?=
HOSTILE_OUT         ?= bench_results/hostile-$(shell date +%Y%m%d-%H%M%S).json

hostile: $(STAMP) ## hostile-load suite against the running stack (bombs, 10x overload, processes up after) -> bench_results/hostile-*.json
	$(PY) -m cosyvoice_tools.hostile \
		--grpc $$($(PY) -m cosyvoice_tools.profile --run-dir $(STACK_RUN_DIR) --print-addresses gateway-grpc) \
		--http http://$$($(PY) -m cosyvoice_tools.profile --run-dir $(STACK_RUN_DIR) --print-addresses gateway-http) \
		--run-dir $(STACK_RUN_DIR) --concurrency $(HOSTILE_CONCURRENCY) --out $(HOSTILE_OUT) $(HOSTILE_ARGS)

profile: $(STAMP) ## per-stage table of the running stack (gateway histograms + Triton stats); WATCH=2 refreshes
	$(PY) -m cosyvoice_tools.profile --run-dir $(STACK_RUN_DIR) $(if $(WATCH),--watch $(WATCH),)

stage-load: $(STAMP) ## load one stage server alone with recorded inputs: STAGE=token2wav STAGE_CONCURRENCY=4 STAGE_DURATION_S=20
	test -d $(STAGE_INPUTS)/$(STAGE) || $(PY) -m cosyvoice_tools.stage_load record --model-dir $(MODEL_DIR) \
		--device $(STAGE_DEVICE) --out $(STAGE_INPUTS)
	$(PY) -m cosyvoice_tools.stage_load run --stage $(STAGE) --inputs $(STAGE_INPUTS) --run-dir $(STACK_RUN_DIR) \
		--concurrency $(STAGE_CONCURRENCY) --duration-s $(STAGE_DURATION_S)

# --- seed ---
# The seed's runtime/triton_trtllm/run.sh stages 0-5, in its order, against our stack (gateway README,
# "Seed-compatible Triton endpoint"). `make up` already serves `cosyvoice2` streaming on 8000/8001/8002 and
# offline on 8010/8011/8012; these targets reproduce the seed's workflow step by step.
SEED_ADDR          ?= 127.0.0.1
SEED_NUM_TASKS     ?= 4
SEED_MODE          ?= streaming
USE_SPK2INFO_CACHE ?= False
SEED_MANIFEST      ?= bench/seedtts-like/manifest.jsonl
SEED_LOG_DIR       ?= bench_results/seed_$(SEED_MODE)_tasks$(SEED_NUM_TASKS)_spk_cache_$(USE_SPK2INFO_CACHE)
SEED_REPOS         ?= run/seed-repos
PROMPT_WAV         ?= bench/seedtts-like/prompts/en_7_001.wav
PROMPT_TEXT        ?= If you have any questions about your order, our support team is happy to help.
TARGET_TEXT        ?= The quick brown fox jumps over the lazy dog near the river bank.
ENGINE_DIR         ?= build/trt_engines

.PHONY: seed-download seed-build seed-repo seed-launch seed-http seed-bench seed-spk2info seed-stub-env \
	seed-stage-0 seed-stage-1 seed-stage-2 seed-stage-3 seed-stage-4 seed-stage-5

seed-download: $(STAMP) ## run.sh stage 0 (download): model dir (random weights unless MODEL_DIR holds a checkpoint) + front stub env
	test -f $(MODEL_DIR)/cosyvoice2.yaml || $(MAKE) model
	$(MAKE) seed-stub-env

seed-stub-env: $(STAMP) ## numpy<2 interpreter env for the cosyvoice2 fronts' Python stub (build/seed-stub-python; wheels from .whl/ or the index)
	$(PY) -m cosyvoice_launcher.seed_repo stub-env --target build/seed-stub-python --wheels .whl

seed-build: $(STAMP) ## run.sh stage 1 (convert/build): LLM_BACKEND=trtllm builds the TensorRT-LLM engine into ENGINE_DIR; our PyTorch engine needs none
	@if [ "$(LLM_BACKEND)" = "trtllm" ]; then services/llm/trtllm/build_engine.sh --model-dir $(MODEL_DIR) --engine-dir $(ENGINE_DIR); \
	else echo "seed stage 1: nothing to convert for the PyTorch LLM engine (LLM_BACKEND=trtllm to build a TensorRT-LLM engine)"; fi

seed-repo: $(STAMP) ## run.sh stage 2 (model repository): render the streaming + offline cosyvoice2 repos into SEED_REPOS (make up renders its own)
	MODEL_DIR=$(MODEL_DIR) $(PY) -m cosyvoice_launcher.seed_repo render --out $(SEED_REPOS)

seed-launch: up ## run.sh stage 3 (launch): the whole stack incl. cosyvoice2 streaming 8000-8002 and offline 8010-8012

seed-http: $(STAMP) ## run.sh stage 4: one HTTP request to the offline cosyvoice2 (8010), like client_http.py; writes out_seed_http.wav
	$(PY) -m cosyvoice_tools.seed_client --protocol http --server-addr $(SEED_ADDR) --server-port 8010 --mode offline \
		--reference-audio $(PROMPT_WAV) --reference-text "$(PROMPT_TEXT)" --target-text "$(TARGET_TEXT)" --log-dir bench_results/seed_http
	cp bench_results/seed_http/test.wav out_seed_http.wav

seed-bench: $(STAMP) ## run.sh stage 5: gRPC benchmark like client_grpc.py (SEED_MODE=streaming|offline, SEED_NUM_TASKS, USE_SPK2INFO_CACHE, SEED_MANIFEST)
	$(PY) -m cosyvoice_tools.seed_client --server-addr $(SEED_ADDR) --server-port $(if $(filter offline,$(SEED_MODE)),8011,8001) \
		--mode $(SEED_MODE) --num-tasks $(SEED_NUM_TASKS) --use-spk2info-cache $(USE_SPK2INFO_CACHE) \
		--manifest-path $(SEED_MANIFEST) --log-dir $(SEED_LOG_DIR)

seed-spk2info: $(STAMP) ## register the fronts' default speaker (SEED_SPEAKER, default 001) through the gateway: PROMPT_WAV=... PROMPT_TEXT=...
	$(VENV)/bin/cosyvoice voices add $${SEED_SPEAKER:-001} --server 127.0.0.1:$${GRPC_PORT:-50051} \
		--prompt-wav $(PROMPT_WAV) --prompt-text "$(PROMPT_TEXT)"

# The seed's stage numbers (run.sh 0..5) as aliases of the targets above.
seed-stage-0: seed-download
seed-stage-1: seed-build
seed-stage-2: seed-repo
seed-stage-3: seed-launch
seed-stage-4: seed-http
seed-stage-5: seed-bench
