//! The gateway's Redis functions (`lua/chat.lua`, one library): their names, and loading them
//! where they are missing. Functions rather than `EVALSHA` scripts because Redis keeps them
//! with its data and replicates them (a restarted server or a promoted replica has them), and
//! because fred sends `FCALL`s in a pipeline.

use fred::clients::Client;
use fred::interfaces::FunctionInterface;
use fred::types::FromValue;

use crate::broker::BrokerError;

/// The library, loaded with `FUNCTION LOAD REPLACE` on every primary.
const LIBRARY: &str = include_str!("../lua/chat.lua");

/// Appends chat messages to their rooms' histories and publishes them.
pub(super) const APPEND: &str = "chatgw_v3_append";
/// Where a room's history ends (giving it an epoch if it has none).
pub(super) const HEAD: &str = "chatgw_v3_head";
/// Reads a room's history for a replay.
pub(super) const HISTORY: &str = "chatgw_v3_history";
/// Marks users online in a room (and drops expired entries).
pub(super) const PRESENCE_UPSERT: &str = "chatgw_v3_presence_upsert";
/// Takes users offline in a room.
pub(super) const PRESENCE_REMOVE: &str = "chatgw_v3_presence_remove";

/// Loads the library on every primary (replacing an older copy of the same version).
pub(super) async fn load(client: &Client) -> Result<(), BrokerError> {
    let _: fred::types::Value = client.function_load_cluster(true, LIBRARY).await?;
    Ok(())
}

/// Whether an error says the library is not loaded on the server that answered.
pub(super) fn missing(error: &fred::error::Error) -> bool {
    error.details().contains("Function not found")
}

/// Calls `function` through `client`, loading the library with `loader` first if the server
/// lacks it (a fresh Redis).
pub(super) async fn call<R, C>(
    client: &C,
    loader: &Client,
    function: &'static str,
    keys: Vec<String>,
    args: Vec<String>,
) -> Result<R, BrokerError>
where
    R: FromValue,
    C: FunctionInterface + Sync,
{
    match client.fcall(function, keys.clone(), args.clone()).await {
        Err(error) if missing(&error) => {
            load(loader).await?;
            Ok(client.fcall(function, keys, args).await?)
        }
        result => Ok(result?),
    }
}
