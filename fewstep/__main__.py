"""``python -m fewstep ...``: the command line, for launchers that take a module (``accelerate launch -m fewstep``)."""

from fewstep.cli import main

if __name__ == "__main__":
    main()
