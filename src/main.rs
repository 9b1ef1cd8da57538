//! `bertqa` — fine-tune BERT for extractive QA. See `bertqa --help`.

use bertqa::cli;
use clap::{Parser, Subcommand};

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
}

fn main() {
    let args = Cli::parse();
    let res = match &args.cmd {
        Cmd::Train(a) => cli::train::run(a),
        Cmd::InitRandom(a) => cli::init::run(a),
        Cmd::Convert(a) => cli::init::convert(a),
        Cmd::Score(a) => cli::score::run(a),
        Cmd::Eval(a) => cli::eval::run_eval(a),
        Cmd::Predict(a) => cli::eval::run_predict(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
