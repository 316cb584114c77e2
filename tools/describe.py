"""Print a model's architecture: layers and mixers, parameters, streaming state, receptive fields, cost in L.

    python tools/describe.py model=megalodon
    python tools/describe.py model=mega model.d_model=256 model.depth=8
    python tools/describe.py model=hybrid_tcn_attention "model.layers=[tcn,tcn,softmax_attention]" model.depth=9
    python tools/describe.py model=mega head@model.head=classification

Arguments are Hydra overrides of conf/config.yaml.
"""
import sys

from seqmix import SeqmixError, instantiate_model
from seqmix.configs import compose_config, config_groups
from seqmix.summary import describe_model


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        print("Model presets:", ", ".join(config_groups()["model"]))
        return 0
    try:
        config = compose_config(argv)
        model = instantiate_model(config.model)
    except SeqmixError as error:
        print(f"describe: error: {error}", file=sys.stderr)
        return 2
    preset = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("model=")), "mega")
    print(describe_model(model, title=preset))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
