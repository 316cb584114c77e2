"""Stream sampled text from a trained byte-level model through its step() (constant memory).

    python tools/generate.py checkpoint=<run dir> prompt="def " [tokens=300] [temperature=0.8] [top_k=40] [seed=0]

temperature=0 decodes greedily.
"""
import sys

import torch

from seqmix import SeqmixError
from seqmix.cli import key_value_options
from seqmix.generation import stream_tokens
from seqmix.training import load_run


def main(argv: list[str]) -> int:
    options = key_value_options(argv, __doc__, required=("checkpoint",))
    try:
        model, _ = load_run(options["checkpoint"])
        if model.vocab_size < 256:
            raise SeqmixError(f"generate: the model's vocabulary has {model.vocab_size} tokens; text needs a byte model (256)")
        prompt = options.get("prompt", "def ")
        top_k = options.get("top_k", "40")
        tokens = stream_tokens(
            model,
            torch.tensor([list(prompt.encode())]),
            int(options.get("tokens", 300)),
            temperature=float(options.get("temperature", 0.8)),
            top_k=None if top_k in ("none", "None", "0") else int(top_k),
            generator=torch.Generator().manual_seed(int(options.get("seed", 0))),
        )
        sys.stdout.write(prompt)
        pending = b""
        for token in tokens:
            pending += bytes([int(token[0])])
            try:
                sys.stdout.write(pending.decode("utf-8"))
                pending = b""
            except UnicodeDecodeError:
                if len(pending) >= 4:  # not a UTF-8 sequence after all
                    sys.stdout.write(pending.decode("utf-8", errors="replace"))
                    pending = b""
            sys.stdout.flush()
        print()
    except SeqmixError as error:
        print(f"generate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
