"""The `distllama` console script: `distllama generate ...`, `distllama convert ...`, `distllama bench ...`,
`distllama merge OUT.jsonl SHARD.jsonl...`."""

import sys

COMMANDS = {
    "generate": "distllama.generate",
    "convert": "distllama.convert",
    "bench": "distllama.bench",
    "merge": "distllama.merge",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: distllama {" + ",".join(COMMANDS) + "} [options]   (no command: generate)")
        return 0
    command = argv[0] if argv and argv[0] in COMMANDS else "generate"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    module = __import__(COMMANDS[command], fromlist=["main"])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
