
#compdef llmctl

_llmctl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _LLMCTL_COMPLETE=complete_zsh llmctl)
}

compdef _llmctl_completion llmctl

