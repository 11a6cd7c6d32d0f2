package kdk_test

import (
	"fmt"

	"github.com/nkp-dev/nkp/provider/kdk"
)

func ExampleDerive() {
	cluster := make([]byte, kdk.Size) // in hostd: the KDK the host TPM unwrapped
	key, err := kdk.Derive(cluster, kdk.PurposeVTPM, "6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b", "0f8fad5b-d9cb-469f-a165-70867728950e")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer clear(key)
	fmt.Println(len(key), kdk.Info(kdk.PurposeVTPM, "6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b", "0f8fad5b-d9cb-469f-a165-70867728950e"))
	// Output: 32 nkp/v1/vtpm/6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b/0f8fad5b-d9cb-469f-a165-70867728950e
}
