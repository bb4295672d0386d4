"""`python -m finetune.cogft ...`: the same as the `cogft` console script."""

from finetune.cogft import main

if __name__ == "__main__":  # importing this module (a package walk, a test) must not parse sys.argv
    main()
