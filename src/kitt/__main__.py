from kitt.cli.main import main

main()
