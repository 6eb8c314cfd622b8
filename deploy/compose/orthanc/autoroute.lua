-- Auto-routing to grok-pacs: every colour fundus photograph (Modality OP) and OCT (Modality OPT) that
-- this Orthanc stores is forwarded by C-STORE to the modality "grok" of DicomModalities (the grok-pacs
-- listener). Everything else stays here, including the SRs grok-pacs sends back (Modality SR): no loop.

local GROK_MODALITY = 'grok'
local FORWARDED_MODALITIES = { OP = true, OPT = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Instances that a Lua script itself created (e.g. modified copies) are not forwarded again.
  if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
    return
  end
  if FORWARDED_MODALITIES[tags['Modality']] then
    -- A failed send raises a Lua error: Orthanc logs it with the instance id; the instance stays here
    -- and can be re-sent from Orthanc Explorer ("Send to DICOM modality") or the REST API.
    SendToModality(instanceId, GROK_MODALITY)
    print('grok-pacs autoroute: sent ' .. tags['Modality'] .. ' instance ' .. instanceId .. ' to ' .. GROK_MODALITY)
  end
end
