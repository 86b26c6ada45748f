"""``python -m bundle.deploy -i <input> -o <output> -m <bundle>`` (repository root) or ``python bundle/deploy ...``;
also the entry point of the packaged MONAI Application Package."""

if __package__:
    from .app import main
else:  # run as a folder: python bundle/deploy, or the MAP's /opt/holoscan/app
    from app import main

if __name__ == "__main__":
    main()
