# The two commands of the README. Each does its own set-up, idempotently.
.PHONY: demo test setup setup-test clean

demo:
	./scripts/setup.sh
	.venv/bin/napari-smear demo --out demo-output

test:
	./scripts/setup.sh --gui --testing
	xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf demo-output build dist
