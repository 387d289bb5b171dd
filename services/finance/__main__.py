from services.finance.cli import main

main()
