"""Train, validate, test or predict with hopformer: ``python train.py`` (see hopformer/cli.py)."""

from hopformer.cli import main

if __name__ == "__main__":
    main()
