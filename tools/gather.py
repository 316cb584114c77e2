"""Gather the runs below a directory (e.g. a Hydra sweep of tools/train.py) into one table.

    python tools/gather.py runs/compare_bpb [--csv table.csv]
"""
import argparse

from seqmix.runs import collect_runs, markdown_table, write_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="directory to search for run directories")
    parser.add_argument("--csv", help="also write the table as CSV here")
    args = parser.parse_args()
    rows = collect_runs(args.root)
    print(markdown_table(rows))
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
