"""`make demo`: a small end-to-end distillation on the built-in data."""


def main() -> None:
    print("cocofast demo: the training pipeline is not built yet; `make test` exercises the kernels.")


if __name__ == "__main__":
    main()
