"""``python -m embedpipe`` (and ``torchrun -m embedpipe``)."""

from .cli import main

if __name__ == "__main__":
    main()
