from adaplex.cli import main

main()
