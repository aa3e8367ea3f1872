from taille.cli import main

main()
