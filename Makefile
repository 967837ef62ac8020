# The README's two commands: `make demo` and `make test`. Each builds the venv first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair that pip finds on this project's machines; users may override.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# a small study on the demo kit (built on first use), then its best adapter on the test split;
# running it again continues the same study
demo: $(STAMP)
	$(VENV)/bin/hpo-peft study run studies/demo.yaml
	$(VENV)/bin/hpo-peft evaluate studies/demo.yaml

# the full suite also needs PostgreSQL, SLURM (slurm-wlm, munge) and Chromium: installed with apt-get
# when missing and this user may (root or sudo), else one line says what to install
test: $(STAMP)
	bash scripts/system-deps.sh
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) local_data/demo
