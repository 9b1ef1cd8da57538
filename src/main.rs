//! `bertqa` — fine-tune BERT for extractive QA. See `bertqa --help`.

use bertqa::cli;
use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bertqa",
    version,
    about = "From-scratch BERT fine-tuning for SQuAD (CPU reference + CUDA)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a BERT checkpoint on SQuAD
    // a flag given twice takes its last value (scripts/train_squad.sh passes defaults that users may override)
    #[command(args_override_self = true)]
    Train(Box<cli::train::TrainArgs>),
    /// Write a randomly initialised BertForQuestionAnswering directory
    InitRandom(cli::init::InitArgs),
    /// Rewrite a model as a BertForQuestionAnswering checkpoint in f32/f16/bf16
    Convert(cli::init::ConvertArgs),
    /// Score a predictions.json against a SQuAD file (drop-in for the official script)
    Score(cli::score::ScoreArgs),
    /// Run a QA model over a SQuAD file: predictions + EM/F1
    Eval(cli::eval::EvalArgs),
    /// Answer one question about one context
    Predict(cli::eval::PredictArgs),
    /// Compile the CUDA kernels ahead of time (into the cache, or a folder for BERTQA_KERNELS elsewhere)
    Kernels(cli::kernels::KernelsArgs),
}

fn main() {
    // a file over `ulimit -f` is then an error naming it ("File too large"), not a silent death by SIGXFSZ
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread is started
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // parsed in two steps so that `train` can tell the flags given on the command line from defaults
    // (ArgMatches::value_source): on --resume those are compared with the checkpoint's settings
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        // --help and --version go to standard output: one that cannot be written (a full disk) is an
        // error, as for every other command's output; a reader that stopped early (`| head`) is not
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            use std::io::Write;
            match e.print().and_then(|_| std::io::stdout().flush()) {
                Ok(()) => std::process::exit(0),
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
                Err(err) => {
                    bertqa::say!("error: writing to standard output: {err}");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => e.exit(),
    };
    let args = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let res = match &args.cmd {
        Cmd::Train(a) => {
            let given = cli::train::GivenFlags::from_matches(matches.subcommand_matches("train"));
            cli::train::run(a, &given)
        }
        Cmd::InitRandom(a) => cli::init::run(a).map(|_| 0),
        Cmd::Convert(a) => cli::init::convert(a).map(|_| 0),
        Cmd::Score(a) => cli::score::run(a).map(|_| 0),
        Cmd::Eval(a) => cli::eval::run_eval(a).map(|_| 0),
        Cmd::Predict(a) => cli::eval::run_predict(a).map(|_| 0),
        Cmd::Kernels(a) => cli::kernels::run(a).map(|_| 0),
    };
    match res {
        Ok(0) => {}
        // an interrupted `train`: 128 + the signal (130 SIGINT, 143 SIGTERM)
        Ok(code) => std::process::exit(code),
        Err(e) => {
            bertqa::say!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
