from replacer.cli import main

main()
