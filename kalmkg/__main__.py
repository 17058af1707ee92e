from kalmkg.cli import main

main()
