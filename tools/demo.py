"""Build every registered mixer, run it in parallel and streamed, and print how well they agree.

    python tools/demo.py [--width 64] [--length 256] [--batch 2] [--piece 17]
"""
import argparse

from seqmix.showcase import format_tour, tour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="model width D")
    parser.add_argument("--length", type=int, default=256, help="sequence length L")
    parser.add_argument("--batch", type=int, default=2, help="batch size B")
    parser.add_argument("--piece", type=int, default=17, help="tokens per streaming step")
    args = parser.parse_args()
    rows = tour(width=args.width, length=args.length, batch=args.batch, piece=args.piece)
    print(f"Every mixer at D={args.width}, L={args.length}, B={args.batch}, streamed {args.piece} tokens per step (float32):")
    print(format_tour(rows))
    worst = max(row.max_stream_error for row in rows)
    print(f"\nLargest forward-vs-streaming difference: {worst:.2e} (float32 rounding; the tests check float64 to 1e-9)")


if __name__ == "__main__":
    main()
