from kalmkg.cli.app import main

main()
