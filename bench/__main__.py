import sys

if __name__ == "__main__":
    from bench.run import main

    sys.exit(main())
